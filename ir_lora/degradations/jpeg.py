"""A float model of baseline JPEG (libjpeg / Pillow defaults, 4:2:0), jit- and vmap-able.

The model follows libjpeg's encoder and decoder step by step: JFIF RGB to YCbCr rounded to 8 bits;
2x2 chroma averaging with libjpeg's alternating rounding bias; edge replication to whole 8x8 blocks;
level shift; orthonormal 8x8 DCT (libjpeg's integer DCT computes the same transform); division by
the IJG standard tables scaled by quality (`jpeg_set_quality` with baseline clipping to [1, 255])
and rounding; the inverse; libjpeg's default "fancy" triangular chroma upsampling, with its integer
rounding; YCbCr to RGB rounded and clipped to 8 bits. Against Pillow's encode/decode of photographs
it reaches about 45-50 dB (tests/degradations/test_degradations.py; benchmarks/jpeg_fidelity.py
prints a table).
"""

import jax.numpy as jnp
import numpy as np

from ir_lora.degradations._util import per_image

_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.int32,
)
_CHROMA_TABLE = np.full((8, 8), 99, np.int32)
_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    m = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    m[0] = np.sqrt(1 / 8)
    return m.astype(np.float32)


_DCT = _dct_matrix()


def quantization_tables(quality) -> tuple[jnp.ndarray, jnp.ndarray]:
    """IJG tables for `quality` in [1, 100] (libjpeg `jpeg_set_quality`, force_baseline=TRUE)."""
    q = jnp.clip(jnp.round(jnp.asarray(quality, jnp.float32)), 1, 100).astype(jnp.int32)
    scale = jnp.where(q < 50, 5000 // q, 200 - 2 * q)

    def scaled(table):
        return jnp.clip((table * scale + 50) // 100, 1, 255).astype(jnp.float32)

    return scaled(jnp.asarray(_LUMA_TABLE)), scaled(jnp.asarray(_CHROMA_TABLE))


def _pad_to(plane: jnp.ndarray, multiple: int) -> jnp.ndarray:
    h, w = plane.shape
    return jnp.pad(plane, ((0, -h % multiple), (0, -w % multiple)), mode="edge")


def _quantise_plane(plane: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """Block DCT, quantisation, dequantisation and inverse DCT of one 8-bit plane."""
    h, w = plane.shape
    padded = _pad_to(plane, 8)
    hp, wp = padded.shape
    blocks = padded.reshape(hp // 8, 8, wp // 8, 8) - 128.0
    d = jnp.asarray(_DCT)
    coef = jnp.einsum("ui,aibj,vj->aubv", d, blocks, d, precision="highest")
    coef = jnp.round(coef / table[None, :, None, :]) * table[None, :, None, :]
    pixels = jnp.einsum("ui,aubv,vj->aibj", d, coef, d, precision="highest")
    out = jnp.clip(jnp.round(pixels + 128.0), 0.0, 255.0).reshape(hp, wp)
    return out[:h, :w]


def _downsample(plane: jnp.ndarray) -> jnp.ndarray:
    """libjpeg `h2v2_downsample`: 2x2 sums plus a bias of 1, 2, 1, 2, ... then integer /4."""
    h, w = plane.shape
    s = plane.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    bias = 1.0 + (jnp.arange(w // 2) % 2)
    return jnp.floor((s + bias) / 4.0)


def _fancy_upsample(plane: jnp.ndarray) -> jnp.ndarray:
    """libjpeg `h2v2_fancy_upsample`: 3/4-1/4 triangle filter both ways, its integer rounding."""
    up = jnp.concatenate([plane[:1], plane[:-1]], axis=0)
    down = jnp.concatenate([plane[1:], plane[-1:]], axis=0)
    rows = jnp.stack([3 * plane + up, 3 * plane + down], axis=1)  # exact integers
    rows = rows.reshape(-1, plane.shape[1])
    left = jnp.concatenate([rows[:, :1], rows[:, :-1]], axis=1)
    right = jnp.concatenate([rows[:, 1:], rows[:, -1:]], axis=1)
    even = jnp.floor((3 * rows + left + 8) / 16)
    odd = jnp.floor((3 * rows + right + 7) / 16)
    return jnp.stack([even, odd], axis=2).reshape(rows.shape[0], -1)


@per_image(keyed=False)
def jpeg(image, *, quality):
    """JPEG-compresses an RGB image in [0, 1] at `quality` (1-100; Python number or traced).

    Args:
      image: `(H, W, 3)` or `(N, H, W, 3)` float image in [0, 1].
      quality: IJG quality; values outside [1, 100] are clipped, fractions rounded.

    Returns:
      The decoded image, same shape, in [0, 1], quantised to multiples of 1/255.
    """
    if image.shape[-1] != 3:
        raise ValueError(f"jpeg: image must have 3 (RGB) channels, got shape {image.shape}")
    h, w, _ = image.shape
    rgb = jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0)
    # libjpeg replicates the last column/row to give chroma subsampling whole 2x2 cells.
    rgb = jnp.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = jnp.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = jnp.clip(jnp.round(-0.168736 * r - 0.331264 * g + 0.5 * b + 128.0), 0, 255)
    cr = jnp.clip(jnp.round(0.5 * r - 0.418688 * g - 0.081312 * b + 128.0), 0, 255)
    luma_q, chroma_q = quantization_tables(quality)
    y = _quantise_plane(y, luma_q)
    cb = _fancy_upsample(_quantise_plane(_downsample(cb), chroma_q)) - 128.0
    cr = _fancy_upsample(_quantise_plane(_downsample(cr), chroma_q)) - 128.0
    out = jnp.stack(
        [
            y + jnp.round(1.402 * cr),
            y + jnp.round(-0.344136 * cb - 0.714136 * cr),
            y + jnp.round(1.772 * cb),
        ],
        axis=-1,
    )
    return jnp.clip(out, 0.0, 255.0)[:h, :w] / 255.0
