"""The degradation operators against numpy / scipy / Pillow references and their own parameters."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import ndimage

from ir_lora import degradations as D


def _photo(name, h=160, w=203):
    """A crop of a scikit-image photograph (odd width exercises JPEG's edge replication)."""
    return getattr(skimage.data, name)()[:h, :w].astype(np.float32) / 255.0


def _psnr(a, b):
    return 10 * np.log10(
        1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    )


def test_fft_convolution_matches_scipy_and_lax():
    rng = np.random.default_rng(0)
    image = rng.random((20, 27, 3)).astype(np.float32)
    kernel = rng.random((7, 7)).astype(np.float32)
    got = np.asarray(D._util.convolve(jnp.asarray(image), jnp.asarray(kernel)))
    ref = np.stack([ndimage.convolve(image[..., c], kernel, mode="mirror") for c in range(3)], -1)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    direct = D._util.convolve_direct(jnp.asarray(image), jnp.asarray(kernel))
    np.testing.assert_allclose(got, direct, atol=1e-5)


def test_gaussian_kernel_moments():
    iso = np.asarray(D.gaussian_kernel(sigma_x=1.5, sigma_y=1.5, angle=0.0, support=21))
    ax = np.arange(-10, 11)
    g = np.exp(-0.5 * (ax / 1.5) ** 2)
    np.testing.assert_allclose(iso, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-6)
    # Anisotropic: the kernel's covariance is R diag(sx^2, sy^2) R^T.
    sx, sy, theta = 2.5, 1.0, 0.6
    k = np.asarray(D.gaussian_kernel(sigma_x=sx, sigma_y=sy, angle=theta, support=21))
    y, x = np.meshgrid(ax, ax, indexing="ij")
    cov = np.array([[np.sum(k * x * x), np.sum(k * x * y)], [np.sum(k * x * y), np.sum(k * y * y)]])
    r = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(cov, r @ np.diag([sx**2, sy**2]) @ r.T, atol=2e-3)
    # The support window zeroes everything outside the sampled size.
    small = np.asarray(D.gaussian_kernel(sigma_x=3.0, sigma_y=3.0, angle=0.0, support=7))
    assert small[:7].sum() == 0 and small[:, 14:].sum() == 0
    assert np.isclose(small.sum(), 1.0)


def test_motion_kernels():
    length, angle = 15.0, 0.3
    k = np.asarray(D.line_kernel(length=length, angle=angle, kernel_size=31))
    ax = np.arange(-15, 16)
    y, x = np.meshgrid(ax, ax, indexing="ij")
    along = np.cos(angle) * x + np.sin(angle) * y
    assert np.isclose(k.sum(), 1.0) and k.min() >= 0
    # A uniform segment of length L has variance L^2 / 12 along its axis.
    np.testing.assert_allclose(np.sum(k * along**2), length**2 / 12, rtol=0.1)
    trajectory = jax.jit(lambda k: D.trajectory_kernel(k, length=21.0, kernel_size=31))
    t = np.asarray(trajectory(jax.random.key(3)))
    assert np.isclose(t.sum(), 1.0) and t.min() >= 0
    rows, cols = np.nonzero(t > 0)
    assert max(np.ptp(rows), np.ptp(cols)) <= 22 and (t > 0).sum() > 10


@pytest.mark.parametrize(
    "kind,correlated", [(D.COLOUR, False), (D.GREY, True), (D.CORRELATED, True)]
)
def test_gaussian_noise_std(kind, correlated):
    x = jnp.full((128, 128, 3), 0.5)
    sigma = 20 / 255
    n = np.asarray(D.gaussian_noise(jax.random.key(0), x, sigma=sigma, kind=kind)) - 0.5
    np.testing.assert_allclose(n.reshape(-1, 3).std(0), sigma, rtol=0.03)
    corr = np.corrcoef(n.reshape(-1, 3).T)[0, 1]
    assert (abs(corr) > 0.1) == correlated
    if kind == D.GREY:
        np.testing.assert_allclose(n[..., 0], n[..., 2], atol=1e-6)


def test_poisson_and_speckle_scale_with_signal():
    x = jnp.concatenate([jnp.full((64, 128, 3), 0.2), jnp.full((64, 128, 3), 0.8)])
    p = np.asarray(D.poisson_noise(jax.random.key(1), x, scale=1000.0)) - np.asarray(x)
    np.testing.assert_allclose(p[:64].var(), 0.2 / 1000, rtol=0.05)
    np.testing.assert_allclose(p[64:].var(), 0.8 / 1000, rtol=0.05)
    s = np.asarray(D.speckle_noise(jax.random.key(2), x, sigma=0.1)) - np.asarray(x)
    np.testing.assert_allclose([s[:64].std(), s[64:].std()], [0.02, 0.08], rtol=0.05)


def _pillow_jpeg(image, quality):
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(
        buf, "JPEG", quality=quality, subsampling=2
    )
    return np.asarray(Image.open(buf), np.float32) / 255.0


def test_jpeg_matches_pillow():
    photos = [_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    model = jax.jit(lambda x, q: D.jpeg(x, quality=q))
    for quality in (10, 30, 50, 75, 95):
        psnr = [_psnr(model(p, quality), _pillow_jpeg(p, quality)) for p in photos]
        assert np.mean(psnr) >= 44.0, (quality, psnr)
        assert min(psnr) >= 40.0, (quality, psnr)


def test_jpeg_tables_match_pillow():
    for quality in (1, 10, 50, 90, 100):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, "JPEG", quality=quality, subsampling=2)
        tables = Image.open(buf).quantization
        luma, chroma = D.quantization_tables(quality)
        np.testing.assert_array_equal(np.asarray(luma).ravel(), tables[0])
        np.testing.assert_array_equal(np.asarray(chroma).ravel(), tables[1])


@pytest.mark.parametrize("method,pil", [(0, Image.BICUBIC), (1, Image.BILINEAR)])
def test_resample_matches_pillow(method, pil):
    photo = _photo("astronaut", 128, 128)
    got = D.resample(jax.random.key(0), photo, factor=2.0, method=method)
    img = Image.fromarray(np.round(photo * 255).astype(np.uint8))
    ref = np.asarray(img.resize((64, 64), pil).resize((128, 128), pil), np.float32) / 255
    assert _psnr(got, ref) > 40
    same = D.resample(jax.random.key(0), photo, factor=1.0, method=method)
    np.testing.assert_allclose(same, photo, atol=1e-5)


def test_rain_adds_vertical_streaks():
    x = jnp.full((96, 96, 3), 0.3)
    y = np.asarray(D.rain(jax.random.key(0), x, density=0.005, length=25.0, angle=0.0))
    added = y[..., 0] - 0.3
    assert added.min() >= -1e-6 and added.max() > 0.3
    # Vertical streaks: neighbours below correlate much more than neighbours to the right.
    a = added - added.mean()
    vertical = np.mean(a[:-3] * a[3:])
    horizontal = np.mean(a[:, :-3] * a[:, 3:])
    assert vertical > 5 * abs(horizontal)


def test_haze_follows_scattering_model():
    photo = _photo("coffee", 64, 64)
    assert np.allclose(D.haze(jax.random.key(0), photo, beta=0.0, airlight=0.9), photo, atol=1e-6)
    hazy = np.asarray(D.haze(jax.random.key(0), photo, beta=3.0, airlight=0.9, depth_mix=0.0))
    # depth_mix=0 is a pure ramp, depth 1 at the top row to 0 at the bottom.
    t = np.exp(-3.0 * np.linspace(1.0, 0.0, 64))[:, None, None]
    np.testing.assert_allclose(hazy, photo * t + 0.9 * (1 - t), atol=1e-5)
    # With the random field, depth varies along rows too and the haze is thickest where it is far.
    field = np.asarray(D.haze(jax.random.key(1), photo, beta=2.0, airlight=1.0, depth_mix=1.0))
    t_est = (1.0 - field) / np.maximum(1.0 - photo, 1e-3)
    assert t_est.min() >= np.exp(-2.0) - 1e-3 and t_est.max() <= 1 + 1e-3
    assert np.ptp(t_est[32]) > 0.1


def test_low_light_darkens():
    photo = _photo("chelsea", 64, 64)
    dark = D.low_light(jax.random.key(0), photo, gamma=2.0, gain=0.3, shot=0.0, read=0.0)
    np.testing.assert_allclose(dark, 0.3 * photo**2, atol=1e-6)
    noisy = D.low_light(jax.random.key(0), photo, gamma=2.0, gain=0.3, shot=0.0, read=0.01)
    np.testing.assert_allclose(np.std(np.asarray(noisy) - np.asarray(dark)), 0.01, rtol=0.15)


def test_batched_parameters_equal_per_image_calls():
    x = jnp.stack([_photo("astronaut", 32, 32), _photo("coffee", 32, 32)])
    sigma, quality = jnp.array([0.5, 2.0]), jnp.array([10, 90])

    @jax.jit
    def run(x, sigma, quality):
        blurred = D.gaussian_blur(jax.random.key(0), x, sigma_x=sigma)
        singles = [D.gaussian_blur(None, x[i], sigma_x=sigma[i]) for i in range(2)]
        return blurred, singles, D.jpeg(x, quality=quality), D.jpeg(x[1], quality=90)

    blurred, singles, compressed, single_jpeg = run(x, sigma, quality)
    for i in range(2):
        np.testing.assert_allclose(blurred[i], singles[i], atol=1e-5)
    np.testing.assert_allclose(compressed[1], single_jpeg, atol=1e-6)
    assert not np.allclose(compressed[0], compressed[1], atol=1e-3)


def test_adversarial_parameters_stay_finite_and_in_range():
    x = jnp.asarray(_photo("rocket", 48, 48))

    @jax.jit
    def run(x):
        k = jax.random.key(0)
        return {
            "blur_sigma0": D.gaussian_blur(k, x, sigma_x=0.0, sigma_y=0.0),
            "motion_length0": D.motion_blur(k, x, length=0.0, trajectory=True),
            "noise_sigma0": D.gaussian_noise(k, x, sigma=0.0),
            "noise_huge": D.gaussian_noise(k, x, sigma=1e6),
            "poisson_tiny": D.poisson_noise(k, x, scale=0.0),
            "jpeg_q1": D.jpeg(x, quality=1),
            "jpeg_q100": D.jpeg(x, quality=100),
            "rain_dense": D.rain(k, x, density=1.0, length=100.0, brightness=2.0),
            "haze_thick": D.haze(k, x, beta=1e4, airlight=1.0),
            "low_light_0": D.low_light(k, x, gamma=0.0, gain=0.0),
            "resample_huge": D.resample(k, x, factor=1e3, method=2),
            "resample_below1": D.resample(k, x, factor=0.1),
        }

    outs = run(x)
    for name, y in outs.items():
        y = np.asarray(y)
        assert y.shape == x.shape, name
        assert np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1, name
    np.testing.assert_allclose(outs["blur_sigma0"], x, atol=1e-5)
    np.testing.assert_allclose(outs["noise_sigma0"], x, atol=1e-7)
    np.testing.assert_allclose(outs["motion_length0"], x, atol=1e-5)
    assert _psnr(outs["jpeg_q100"], x) > 40 > _psnr(outs["jpeg_q1"], x)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="jpeg"):
        D.jpeg(jnp.zeros((8, 8, 1)), quality=50)
    with pytest.raises(ValueError, match="shape"):
        D.gaussian_blur(jax.random.key(0), jnp.zeros((8, 8)), sigma_x=1.0)


def test_parameters_by_position_are_refused_naming_the_keywords():
    image = jnp.zeros((8, 8, 3))
    with pytest.raises(TypeError, match=r"jpeg\(image, quality=\.\.\.\); got 2 positional"):
        D.jpeg(image, 50)
    with pytest.raises(TypeError, match=r"gaussian_noise\(key, image, sigma=\.\.\., kind=\.\.\.\)"):
        D.gaussian_noise(jax.random.key(0), image, 0.1)
    with pytest.raises(TypeError, match=r"takes \(key, image\) by position"):
        D.gaussian_noise(image, sigma=0.1)  # the key forgotten
