"""PSNR/SSIM against scikit-image, hand-computed values and BasicSR's code transcribed here.

Tolerances: PSNR equals skimage's `peak_signal_noise_ratio(data_range=255)` to 1e-10 dB (both are
float64 `10 log10(255^2/mse)`); SSIM equals skimage's `structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=255)` to 1e-10: skimage filters the whole
image with reflect padding and then crops 5 pixels from each edge, which is exactly "valid" mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import metrics as skm

from ir_lora import metrics


def _pair(shape=(40, 36, 3), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    noise = rng.normal(0, 12, shape)
    b = np.clip(a + noise, 0, 255).round().astype(np.uint8)
    return a, b


def _basicsr_to_y_channel(img_bgr):
    """basicsr.metrics.metric_util.to_y_channel + color_util.bgr2ycbcr(y_only=True), transcribed."""
    img = img_bgr.astype(np.float32) / 255.0
    img = img.astype(np.float32)  # _convert_input_type_range: float32 input passes through
    out = np.dot(img, [24.966, 128.553, 65.481]) + 16.0
    out /= 255.0
    out = out.astype(np.float32)[..., None]
    return out * 255.0


@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_matches_skimage(crop_border):
    a, b = _pair()
    c = crop_border
    ref_a, ref_b = (a[c:-c, c:-c], b[c:-c, c:-c]) if c else (a, b)
    expected = skm.peak_signal_noise_ratio(ref_a, ref_b, data_range=255)
    assert metrics.psnr(a, b, crop_border=c) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("crop_border", [0, 3])
def test_ssim_matches_skimage(crop_border):
    a, b = _pair()
    c = crop_border
    ref_a, ref_b = (a[c:-c, c:-c], b[c:-c, c:-c]) if c else (a, b)
    expected = skm.structural_similarity(
        ref_a,
        ref_b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=-1,
    )
    assert metrics.ssim(a, b, crop_border=c) == pytest.approx(expected, abs=1e-10)


def test_y_channel_metrics_match_skimage_on_basicsr_luma():
    a, b = _pair()
    ya = _basicsr_to_y_channel(a[..., ::-1]).astype(np.float64)[..., 0]
    yb = _basicsr_to_y_channel(b[..., ::-1]).astype(np.float64)[..., 0]
    expected_psnr = skm.peak_signal_noise_ratio(ya, yb, data_range=255)
    expected_ssim = skm.structural_similarity(
        ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert metrics.psnr(a, b, test_y_channel=True) == pytest.approx(expected_psnr, abs=1e-10)
    assert metrics.ssim(a, b, test_y_channel=True) == pytest.approx(expected_ssim, abs=1e-10)


def test_rgb_to_y_is_basicsr_bit_for_bit():
    a, _ = _pair()
    np.testing.assert_array_equal(metrics.rgb_to_y(a), _basicsr_to_y_channel(a[..., ::-1]))


@pytest.mark.parametrize(
    "rgb,luma",
    [
        ((0, 0, 0), 16.0),
        ((255, 255, 255), 235.0),
        ((255, 0, 0), 16.0 + 65.481),
        ((0, 255, 0), 16.0 + 128.553),
        ((0, 0, 255), 16.0 + 24.966),
    ],
)
def test_rgb_to_y_of_known_colours(rgb, luma):
    img = np.full((2, 3, 3), rgb, np.uint8)
    y = metrics.rgb_to_y(img)
    assert y.shape == (2, 3, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y, luma, atol=1e-4)


def test_identical_images_give_inf_psnr_and_unit_ssim():
    a, _ = _pair()
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_psnr_and_crop_border():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, :, :] = 10  # only the top row differs: mse = 100 * 8 / 64 per channel
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 12.5), abs=1e-12)
    assert metrics.psnr(a, b, crop_border=1) == float("inf")


def test_float_inputs_are_quantised_like_tensor2img():
    a, _ = _pair()
    # Up to 0.49 of a level away rounds back to the same uint8 image; out-of-range values clamp.
    f = (a.astype(np.float32) + 0.49) / 255.0
    f[0, 0, 0] = 1.7
    a_clamped = a.copy()
    a_clamped[0, 0, 0] = 255
    np.testing.assert_array_equal(metrics.to_uint8(f), a_clamped)
    assert metrics.psnr(f, a_clamped) == float("inf")
    assert metrics.ssim(f.astype(np.float64), a_clamped) == pytest.approx(1.0, abs=1e-12)
    # Rounding, not truncation: 0.6 of a level becomes 1.
    assert metrics.to_uint8(np.float32(0.6 / 255)) == 1


def test_grey_images_accepted_and_y_channel_ignored():
    a, b = _pair(shape=(20, 20))
    expected = skm.peak_signal_noise_ratio(a, b, data_range=255)
    assert metrics.psnr(a, b, test_y_channel=True) == pytest.approx(expected, abs=1e-10)


def test_bad_inputs_raise_clear_errors():
    a, b = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(a, b[:-1])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(a, b[..., :2])
    with pytest.raises(ValueError, match="crop_border"):
        metrics.psnr(a, b, crop_border=18)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a[:14], b[:14], crop_border=2)
    with pytest.raises(ValueError, match="NaN"):
        metrics.psnr(np.full((4, 4, 3), np.nan), np.zeros((4, 4, 3)))
    with pytest.raises(TypeError, match="dtype int32"):
        metrics.psnr(a.astype(np.int32), b.astype(np.int32))


@pytest.mark.parametrize("crop_border,test_y_channel", [(0, False), (2, True)])
def test_psnr_batch_matches_numpy(crop_border, test_y_channel):
    a, b = _pair(shape=(3, 24, 20, 3))
    fa, fb = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    fb[1] = fa[1]  # an identical pair gives inf
    fn = jax.jit(
        lambda x, y: metrics.psnr_batch(
            x, y, crop_border=crop_border, test_y_channel=test_y_channel
        )
    )
    got = np.asarray(fn(jnp.asarray(fa), jnp.asarray(fb)))
    expected = [
        metrics.psnr(fa[i], fb[i], crop_border=crop_border, test_y_channel=test_y_channel)
        for i in range(3)
    ]
    assert got[1] == np.inf
    np.testing.assert_allclose(got[[0, 2]], np.asarray(expected)[[0, 2]], atol=1e-3)


def test_psnr_batch_unquantised_is_raw_float_psnr():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
    y = x + np.float32(0.01)
    got = metrics.psnr_batch(jnp.asarray(x), jnp.asarray(y), quantize=False)
    np.testing.assert_allclose(got, 40.0, atol=1e-3)  # 10 log10(1 / 0.01^2)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr_batch(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 3)))
