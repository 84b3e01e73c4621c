"""Down- then up-sampling by a traced factor at a static image shape.

Each axis is resampled by an `(n, n)` matrix: the down-sampling matrix maps the image onto a
low-resolution grid of `round(n / factor)` pixels (stored in the first rows of an `n`-row array,
the rest replicating the last row) and the up-sampling matrix maps it back. Both matrices are built
from the traced factor, so one compiled program serves every factor.
"""

import jax.numpy as jnp

from ir_lora.degradations._util import clip01, per_image

BICUBIC, BILINEAR, AREA = 0, 1, 2


def _cubic(x):
    """Keys' cubic convolution kernel, a = -0.5 (PIL / OpenCV / MATLAB bicubic)."""
    x = jnp.abs(x)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return jnp.where(x <= 1, near, jnp.where(x < 2, far, 0.0))


def _triangle(x):
    return jnp.maximum(1.0 - jnp.abs(x), 0.0)


def _box_overlap(x, width):
    """Length of [x - 1/2, x + 1/2] inside [-width/2, width/2]."""
    return jnp.clip(jnp.minimum(x + 0.5, width / 2) - jnp.maximum(x - 0.5, -width / 2), 0.0, None)


def _normalise_rows(m):
    s = m.sum(axis=1, keepdims=True)
    return m / jnp.where(jnp.abs(s) > 1e-8, s, 1.0)


def resample_matrix(n: int, factor, method) -> jnp.ndarray:
    """`(n, n)` matrix that down-samples an axis of length `n` by `factor` and up-samples back."""
    f = jnp.maximum(jnp.asarray(factor, jnp.float32), 1.0)
    n_low = jnp.maximum(jnp.round(n / f), 1.0)
    f = n / n_low  # the low-resolution grid tiles the axis exactly
    method = jnp.asarray(method)
    hi = jnp.arange(n, dtype=jnp.float32)
    low = jnp.minimum(jnp.arange(n, dtype=jnp.float32), n_low - 1)  # rows past the end replicate
    # Down: low pixel i is centred at (i + 0.5) f - 0.5 in high-res pixels; kernels are stretched
    # by f (antialiasing).
    x = (hi[None, :] - ((low[:, None] + 0.5) * f - 0.5)) / f
    down = jnp.where(
        method == AREA,
        _box_overlap(hi[None, :] - ((low[:, None] + 0.5) * f - 0.5), f),
        jnp.where(method == BILINEAR, _triangle(x), _cubic(x)),
    )
    down = _normalise_rows(down)
    # Up: high-res pixel y sits at (y + 0.5) / f - 0.5 on the low grid. Area uses bilinear here.
    u = (hi[:, None] + 0.5) / f - 0.5 - jnp.arange(n, dtype=jnp.float32)[None, :]
    up = _normalise_rows(jnp.where(method == BICUBIC, _cubic(u), _triangle(u)))
    return jnp.matmul(up, down, precision="highest")


@per_image
def resample(key, image, *, factor, method=BICUBIC):
    """Down-scales by `factor` (>= 1) and up-scales back to the input size.

    Args:
      key: unused (the operator is deterministic); kept for the common signature.
      image: `(H, W, C)` image in [0, 1].
      factor: down-scaling factor, Python number or traced.
      method: `BICUBIC`, `BILINEAR` or `AREA` (box average down, bilinear up); may be traced.
    """
    del key
    h, w, _ = image.shape
    return apply_resample(
        image, resample_matrix(h, factor, method), resample_matrix(w, factor, method)
    )


def apply_resample(image, mh, mw) -> jnp.ndarray:
    """Applies per-axis `(H, H)` and `(W, W)` resampling matrices to an `(H, W, C)` image."""
    return clip01(jnp.einsum("ij,jkc,lk->ilc", mh, image, mw, precision="highest"))
