"""Full-image restoration of any size: padding to shape buckets, and tiled inference.

`restore_image(restore_fn, lq, ...)` runs a restore function (NHWC float32 in, same shape out)
on one image of any size, the way the official PyTorch test scripts do (Restormer's `demo.py`
and `test_*.py`, SwinIR's `main_test_swinir.py::test`):

* **Padding.** H and W are padded at the bottom and right to a multiple of `pad_multiple`, then
  the output is cropped back. The padding is *reflect* (`x[..., h-2], x[..., h-3], ...`), as
  Restormer's test scripts do (`F.pad(x, (0, pw, 0, ph), "reflect")`): zero padding puts an
  artificial black edge next to the border, which the network treats as content and which bleeds
  into the real border pixels through its receptive field; a reflection continues the image's
  own statistics. (NAFNet pads with zeros inside the model; pass `pad_multiple=1` to leave the
  padding to the model and match its official numbers exactly at the border.) Since every image
  is rounded up to a multiple of `pad_multiple`, a larger value also bounds how many distinct
  shapes, and thus compiled programs, a dataset of varied sizes needs: at most
  `ceil(max_h / m) * ceil(max_w / m)`, usually far fewer.
* **Tiling.** When the padded image is larger than `tile` along either side, it is cut into
  `tile x tile` windows that overlap by at least `tile_overlap`, at the origins
  `range(0, H - tile, tile - overlap)` plus a last window flush with the far edge, as in
  SwinIR/Restormer. A side shorter than `tile` is covered by one window of its full length
  (SwinIR shrinks both sides to `min(tile, H, W)` instead; the two agree whenever both sides of
  the image are at least `tile`). The windows are restored in
  batches of `tile_batch_size` through one compiled program (the last batch is filled up with
  copies of its final window so it has the same shape), and the overlapping outputs are blended:
  - `tile_blend="average"` (default): every window's output counts with weight 1, the uniform
    average of SwinIR/Restormer/BasicSR, so results match their published tiled numbers. A
    window's border pixels see its zero (or "same") padding instead of the neighbouring content,
    so near the inner window edges a convolutional network's output differs from untiled
    inference (by a little, within a receptive-field radius of those edges).
  - `tile_blend="trim"`: a window's outputs within `tile_overlap // 2` of an inner window edge get
    weight 0 (edges on the image border are kept), so every pixel is taken only from windows
    that see its whole neighbourhood. For a network whose receptive-field radius is at most
    `tile_overlap // 2`, the result equals untiled inference up to float rounding.
  The weighted sum and the division run in float64 on the host, so for a pointwise restore
  function either blend equals untiled inference bit for bit.

`restore_fn` is called as given: pass a jitted function so that each distinct input shape
compiles once, with the weights as an argument rather than closed over (a closure bakes them into
every program as constants): `functools.partial(jax.jit(model.apply), variables)`.
`ir_lora.evaluator.evaluate` does that itself.
"""

from collections.abc import Callable

import numpy as np

RestoreFn = Callable[[np.ndarray], np.ndarray]
TILE_BLENDS = ("average", "trim")


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pads the H and W axes of an NHWC batch at the bottom/right to a multiple.

    Args:
      img: `(N, H, W, C)` array.
      multiple: the padded H and W are the smallest multiples of this at least H and W.

    Returns:
      The padded array (the input itself when no padding is needed).
    """
    if multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {multiple}.")
    h, w = img.shape[1:3]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return img
    # A 1-pixel side has nothing to reflect; repeating the edge is the only sensible extension.
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(img, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Window origins along one axis, SwinIR's `range(0, size - tile, stride) + [size - tile]`.

    Args:
      size: length of the axis.
      tile: window length (at most `size`).
      overlap: minimum overlap of neighbouring windows, `0 <= overlap < tile`.

    Returns:
      Sorted, distinct origins; the last window ends exactly at `size`.
    """
    if not 0 < tile <= size:
        raise ValueError(f"tile must be in 1..{size}, got {tile}.")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be in 0..{tile - 1}, got {overlap}.")
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _call(restore_fn: RestoreFn, batch: np.ndarray) -> np.ndarray:
    out = np.asarray(restore_fn(batch))
    if out.shape != batch.shape:
        raise ValueError(
            f"restore_fn must return its input's shape {batch.shape}, returned {out.shape}."
        )
    return out


def _axis_weights(origin: int, tile: int, size: int, margin: int) -> np.ndarray:
    """1 inside a window, 0 within `margin` of its edges that are not on the image border."""
    weights = np.ones(tile, np.float64)
    if margin and origin > 0:
        weights[:margin] = 0.0
    if margin and origin + tile < size:
        weights[tile - margin :] = 0.0
    return weights


def _restore_tiled(
    restore_fn: RestoreFn, img: np.ndarray, tile: int, overlap: int, batch_size: int, blend: str
) -> np.ndarray:
    _, h, w, c = img.shape
    tile_h, tile_w = min(tile, h), min(tile, w)
    overlap_h, overlap_w = min(overlap, tile_h - 1), min(overlap, tile_w - 1)
    trim = blend == "trim"
    origins = [
        (top, left)
        for top in tile_origins(h, tile_h, overlap_h)
        for left in tile_origins(w, tile_w, overlap_w)
    ]
    total = np.zeros((h, w, c), np.float64)
    weight_sum = np.zeros((h, w, 1), np.float64)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        tiles = np.stack([img[0, top : top + tile_h, left : left + tile_w] for top, left in chunk])
        # Fill the last batch with copies so that every call has one shape (one program).
        fill = batch_size - len(chunk)
        if fill:
            tiles = np.concatenate([tiles, np.repeat(tiles[-1:], fill, axis=0)])
        restored = _call(restore_fn, tiles)
        for (top, left), out in zip(chunk, restored, strict=False):
            rows = _axis_weights(top, tile_h, h, overlap_h // 2 if trim else 0)
            cols = _axis_weights(left, tile_w, w, overlap_w // 2 if trim else 0)
            weights = (rows[:, None] * cols[None, :])[..., None]
            total[top : top + tile_h, left : left + tile_w] += weights * out
            weight_sum[top : top + tile_h, left : left + tile_w] += weights
    return (total / weight_sum).astype(np.float32)[None]


def check_settings(
    *, tile: int | None, tile_overlap: int, pad_multiple: int, tile_batch_size: int, tile_blend: str
) -> None:
    """Raises ValueError for settings `restore_image` cannot use."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}.")
    if tile is not None and (tile < 1 or tile % pad_multiple):
        raise ValueError(f"tile={tile} must be a positive multiple of pad_multiple={pad_multiple}.")
    if tile is not None and not 0 <= tile_overlap < tile:
        raise ValueError(f"tile_overlap must be in 0..{tile - 1}, got {tile_overlap}.")
    if tile_blend not in TILE_BLENDS:
        raise ValueError(f"tile_blend must be one of {TILE_BLENDS}, got {tile_blend!r}.")
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}.")


def restore_image(
    restore_fn: RestoreFn,
    lq: np.ndarray,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    pad_multiple: int = 16,
    tile_batch_size: int = 4,
    tile_blend: str = "average",
) -> np.ndarray:
    """Restores one image of any size: pad, run whole or in tiles, crop back.

    Args:
      restore_fn: maps an `(N, h, w, C)` float32 batch to a batch of the same shape; pure and
        preferably jitted.
      lq: the degraded image, `(H, W, C)` or `(1, H, W, C)`, float in [0, 1].
      tile: tile side; the image is tiled when its padded size exceeds it along either side.
        None never tiles. Must be a multiple of `pad_multiple`.
      tile_overlap: minimum overlap between neighbouring tiles, in pixels (SwinIR and Restormer
        default to 32).
      pad_multiple: pad H and W to a multiple of this (reflect padding) before restoring.
      tile_batch_size: tiles per call of `restore_fn`.
      tile_blend: "average" (uniform, as the official scripts) or "trim" (drop each tile's
        inner margins of `tile_overlap // 2`; exact for a receptive-field radius up to that).

    Returns:
      The restored float32 image, unclipped, in the layout of `lq`.

    Raises:
      ValueError: for a bad shape or setting, or a `restore_fn` that changes the shape.
    """
    lq = np.asarray(lq, np.float32)
    batched = lq.ndim == 4
    if lq.ndim == 3:
        lq = lq[None]
    if lq.ndim != 4 or lq.shape[0] != 1 or min(lq.shape[1:]) < 1:
        raise ValueError(
            f"restore_image expects an (H, W, C) or (1, H, W, C) image, got {lq.shape}."
        )
    check_settings(
        tile=tile,
        tile_overlap=tile_overlap,
        pad_multiple=pad_multiple,
        tile_batch_size=tile_batch_size,
        tile_blend=tile_blend,
    )
    h, w = lq.shape[1:3]
    padded = pad_to_multiple(lq, pad_multiple)
    if tile is None or max(padded.shape[1:3]) <= tile:
        restored = _call(restore_fn, padded).astype(np.float32)
    else:
        restored = _restore_tiled(
            restore_fn, padded, tile, tile_overlap, tile_batch_size, tile_blend
        )
    restored = restored[:, :h, :w]
    return restored if batched else restored[0]
