"""PSNR and SSIM with exactly BasicSR's conventions (`basicsr/metrics/psnr_ssim.py`).

Images are `(H, W, C)` or `(H, W)` arrays, either `uint8` on 0..255 or floating point in [0, 1].
A float image is first quantised the way BasicSR's `tensor2img` does before any metric: clamp to
[0, 1] in float32, then `(x * 255).round()` to uint8 (plain `astype(uint8)` would truncate). Then:

* `crop_border` removes that many pixels from every edge;
* `test_y_channel` keeps only the BT.601 ("MATLAB `rgb2ycbcr`") luma of an RGB image, on the 0..255
  scale and unrounded, computed in float32 as `basicsr.metrics.metric_util.to_y_channel` does;
* the metric itself runs in float64. PSNR = `10 log10(255^2 / MSE)`, `inf` for identical images.
  SSIM uses an 11x11 Gaussian window of sigma 1.5 in "valid" mode (no padding), per channel, then
  the mean over channels; this is the original MATLAB SSIM.

A dataset score is the mean of the per-image scores (BasicSR averages per image, not per pixel).

`psnr_batch` is a jittable `jax.numpy` version on batches, for monitoring during training.
"""

import jax.numpy as jnp
import numpy as np

# BT.601 luma on the 0..255 scale (ITU-R BT.601, MATLAB `rgb2ycbcr`), RGB order.
_Y_WEIGHTS_RGB = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def to_uint8(img) -> np.ndarray:
    """Quantises an image to uint8 as BasicSR's `tensor2img` does.

    Args:
      img: uint8 array (returned unchanged), or a float array in [0, 1] (clamped to it).

    Returns:
      The uint8 array of the same shape.

    Raises:
      TypeError: for any other dtype.
      ValueError: if a float image holds NaN or infinity.
    """
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(
            f"Expected a uint8 image or a float image in [0, 1], got dtype {img.dtype}."
        )
    if not np.all(np.isfinite(img)):
        raise ValueError("The image holds NaN or infinite values.")
    # BasicSR clamps and scales a float32 tensor; rounding in float32 keeps its ties identical.
    img = np.clip(img.astype(np.float32), 0.0, 1.0)
    return (img * 255.0).round().astype(np.uint8)


def rgb_to_y(img) -> np.ndarray:
    """BT.601 luma of an RGB image on the 0..255 scale, as BasicSR's `to_y_channel`.

    Args:
      img: `(H, W, 3)` RGB image, uint8 or float in [0, 1].

    Returns:
      `(H, W, 1)` float32 luma on the 0..255 scale, not rounded.
    """
    img = to_uint8(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) RGB image, got shape {img.shape}.")
    # BasicSR scales to [0, 1] in float32, takes a float64 dot product and returns to float32.
    # Its images are BGR (cv2): reversing to BGR and reversing the weights makes the sum run in
    # BasicSR's order, so the result is the same bit for bit.
    x = img.astype(np.float32) / 255.0
    y = np.dot(x[..., ::-1], np.asarray(_Y_WEIGHTS_RGB[::-1], np.float64)) + _Y_OFFSET
    return (y / 255.0).astype(np.float32)[..., None] * np.float32(255.0)


def _prepare(img1, img2, crop_border: int, test_y_channel: bool, fn: str):
    img1, img2 = np.asarray(img1), np.asarray(img2)
    if img1.shape != img2.shape:
        raise ValueError(f"{fn}: image shapes differ: {img1.shape} vs {img2.shape}.")
    if img1.ndim not in (2, 3):
        raise ValueError(f"{fn}: expected (H, W, C) or (H, W) images, got shape {img1.shape}.")
    if crop_border < 0:
        raise ValueError(f"{fn}: crop_border must be >= 0, got {crop_border}.")
    img1, img2 = to_uint8(img1), to_uint8(img2)
    if img1.ndim == 2:
        img1, img2 = img1[..., None], img2[..., None]
    h, w = img1.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"{fn}: crop_border={crop_border} leaves nothing of a {h}x{w} image.")
    if crop_border:
        c = crop_border
        img1, img2 = img1[c:-c, c:-c], img2[c:-c, c:-c]
    if test_y_channel and img1.shape[-1] == 3:
        img1, img2 = rgb_to_y(img1), rgb_to_y(img2)
    return img1.astype(np.float64), img2.astype(np.float64)


def psnr(img1, img2, *, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, BasicSR's `calculate_psnr`.

    Args:
      img1: `(H, W, C)` or `(H, W)` image, uint8 or float in [0, 1].
      img2: image of the same shape.
      crop_border: pixels removed from every edge before measuring.
      test_y_channel: measure on the BT.601 luma of RGB images (ignored for 1-channel images).

    Returns:
      PSNR in dB; `inf` when the quantised images are identical.

    Raises:
      ValueError: for mismatched shapes, a negative or too large `crop_border`, or NaN values.
    """
    a, b = _prepare(img1, img2, crop_border, test_y_channel, "psnr")
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def gaussian_window(size: int = _SSIM_WINDOW, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    """The 1-D normalised Gaussian of `cv2.getGaussianKernel(size, sigma)` (float64)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Correlates a 2-D image with `outer(k, k)` in "valid" mode (the window fully inside)."""
    n = len(k)
    h, w = img.shape
    rows = sum(k[i] * img[i : h - n + 1 + i, :] for i in range(n))
    return sum(k[j] * rows[:, j : w - n + 1 + j] for j in range(n))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    k = gaussian_window()
    mu1, mu2 = _filter_valid(a, k), _filter_valid(b, k)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = _filter_valid(a * a, k) - mu1_sq
    sigma2_sq = _filter_valid(b * b, k) - mu2_sq
    sigma12 = _filter_valid(a * b, k) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return float(ssim_map.mean())


def ssim(img1, img2, *, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """Structural similarity, BasicSR's `calculate_ssim` (the original MATLAB SSIM).

    Args:
      img1: `(H, W, C)` or `(H, W)` image, uint8 or float in [0, 1].
      img2: image of the same shape.
      crop_border: pixels removed from every edge before measuring.
      test_y_channel: measure on the BT.601 luma of RGB images (ignored for 1-channel images).

    Returns:
      The mean over channels of the mean SSIM map.

    Raises:
      ValueError: for mismatched shapes, a bad `crop_border`, NaN values, or an image smaller than
        the 11x11 window after cropping.
    """
    a, b = _prepare(img1, img2, crop_border, test_y_channel, "ssim")
    if min(a.shape[:2]) < _SSIM_WINDOW:
        raise ValueError(
            f"ssim: needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels after cropping, "
            f"got {a.shape[0]}x{a.shape[1]}."
        )
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))


def psnr_batch(
    pred: jnp.ndarray,
    target: jnp.ndarray,
    *,
    crop_border: int = 0,
    test_y_channel: bool = False,
    quantize: bool = True,
) -> jnp.ndarray:
    """Per-image PSNR of float `(N, H, W, C)` batches in [0, 1]; jittable.

    With `quantize=True` the images are clamped and rounded to the 0..255 grid first, so the
    result equals `psnr` up to float32 rounding (about 1e-4 dB). Without it, PSNR of the raw
    float values (the usual training-time monitor).

    Args:
      pred: `(N, H, W, C)` float batch.
      target: float batch of the same shape.
      crop_border: pixels removed from every edge.
      test_y_channel: measure on the BT.601 luma (needs C == 3).
      quantize: quantise to uint8 levels first, as BasicSR's validation does.

    Returns:
      `(N,)` float32 PSNR in dB, `inf` where an image pair is identical.
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr_batch: shapes differ: {pred.shape} vs {target.shape}.")
    if pred.ndim != 4:
        raise ValueError(f"psnr_batch: expected (N, H, W, C) batches, got shape {pred.shape}.")
    if test_y_channel and pred.shape[-1] != 3:
        raise ValueError(f"psnr_batch: test_y_channel needs 3 channels, got shape {pred.shape}.")

    def prepare(x):
        x = x.astype(jnp.float32)
        x = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) if quantize else x * 255.0
        if crop_border:
            x = x[:, crop_border:-crop_border, crop_border:-crop_border]
        if test_y_channel:
            x = (x @ jnp.asarray(_Y_WEIGHTS_RGB, jnp.float32) / 255.0 + _Y_OFFSET)[..., None]
        return x

    mse = jnp.mean((prepare(pred) - prepare(target)) ** 2, axis=(1, 2, 3))
    return jnp.where(mse == 0, jnp.inf, 10.0 * jnp.log10(255.0**2 / mse))
