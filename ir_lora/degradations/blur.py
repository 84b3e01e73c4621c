"""Gaussian and motion blur with sampled kernels inside a fixed, static kernel window.

A kernel's size and shape are traced values; the array that holds it is always `kernel_size` x
`kernel_size` (static), zero outside the sampled support, so one compiled program serves every
sampled kernel.
"""

import jax
import jax.numpy as jnp

from ir_lora.degradations._util import clip01, convolve, per_image

_EPS = 1e-6


def _grid(kernel_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    r = kernel_size // 2
    ax = jnp.arange(-r, r + 1, dtype=jnp.float32)
    return jnp.meshgrid(ax, ax, indexing="ij")  # (y, x)


def _normalise(kernel: jnp.ndarray) -> jnp.ndarray:
    """Unit sum; an all-zero kernel (nothing rasterised) becomes the identity."""
    r = kernel.shape[0] // 2
    delta = jnp.zeros_like(kernel).at[r, r].set(1.0)
    total = kernel.sum()
    return jnp.where(total > _EPS, kernel / jnp.maximum(total, _EPS), delta)


def gaussian_kernel(*, sigma_x, sigma_y, angle, support, kernel_size: int = 21) -> jnp.ndarray:
    """Anisotropic Gaussian kernel (isotropic when `sigma_x == sigma_y`).

    Args:
      sigma_x: standard deviation along the axis at `angle` (pixels); 0 gives the identity.
      sigma_y: standard deviation across it.
      angle: rotation of the first axis, radians.
      support: odd size of the square window kept (BSRGAN's `ksize`), clipped to `kernel_size`.
      kernel_size: static size of the array holding the kernel (odd).
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"gaussian_kernel: kernel_size must be odd, got {kernel_size}")
    y, x = _grid(kernel_size)
    c, s = jnp.cos(angle), jnp.sin(angle)
    u = c * x + s * y
    v = -s * x + c * y
    sx = jnp.maximum(jnp.asarray(sigma_x, jnp.float32), 1e-3)
    sy = jnp.maximum(jnp.asarray(sigma_y, jnp.float32), 1e-3)
    k = jnp.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    half = jnp.clip(jnp.asarray(support, jnp.float32), 1.0, kernel_size) // 2
    inside = (jnp.abs(x) <= half) & (jnp.abs(y) <= half)
    return _normalise(jnp.where(inside, k, 0.0))


def line_kernel(*, length, angle, kernel_size: int = 31) -> jnp.ndarray:
    """Anti-aliased straight segment of `length` pixels through the centre (linear motion).

    The weight of a pixel is its coverage by a one-pixel-wide segment: `1 - distance` to the
    segment's axis, for pixels within `length / 2` along it.
    """
    y, x = _grid(kernel_size)
    c, s = jnp.cos(angle), jnp.sin(angle)
    along = c * x + s * y
    across = -s * x + c * y
    half = jnp.clip(jnp.asarray(length, jnp.float32), 1.0, kernel_size) / 2.0
    w_across = jnp.clip(1.0 - jnp.abs(across), 0.0, 1.0)
    w_along = jnp.clip(half + 0.5 - jnp.abs(along), 0.0, 1.0)
    return _normalise(w_across * w_along)


def trajectory_kernel(key, *, length, kernel_size: int = 31, steps: int = 64) -> jnp.ndarray:
    """Random camera-shake trajectory (Boracchi & Foi style random walk with inertia).

    A random walk of `steps` points with momentum is centred, scaled so its extent is `length`
    pixels, and splatted bilinearly into the kernel window.
    """
    k_dir, k_acc = jax.random.split(key)
    theta0 = jax.random.uniform(k_dir, (), maxval=2 * jnp.pi)
    turns = 0.35 * jax.random.normal(k_acc, (steps,))
    # The heading drifts smoothly (cumulative turning), which gives curved, jerky paths.
    heading = theta0 + jnp.cumsum(jnp.cumsum(turns) * 0.2)
    pts = jnp.cumsum(jnp.stack([jnp.cos(heading), jnp.sin(heading)], -1), axis=0)
    pts = pts - 0.5 * (pts.max(0) + pts.min(0))
    extent = jnp.maximum(jnp.max(pts.max(0) - pts.min(0)), _EPS)
    size = jnp.clip(jnp.asarray(length, jnp.float32), 1.0, kernel_size - 1.0)
    pts = pts * ((size - 1.0) / extent) + kernel_size // 2
    pts = jnp.clip(pts, 0.0, kernel_size - 1.0)
    x0 = jnp.floor(pts).astype(jnp.int32)
    frac = pts - x0
    kernel = jnp.zeros((kernel_size, kernel_size), jnp.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            wx = frac[:, 0] if dx else 1.0 - frac[:, 0]
            wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
            xi = jnp.minimum(x0[:, 0] + dx, kernel_size - 1)
            yi = jnp.minimum(x0[:, 1] + dy, kernel_size - 1)
            kernel = kernel.at[yi, xi].add(wx * wy)
    return _normalise(kernel)


@per_image
def gaussian_blur(key, image, *, sigma_x, sigma_y=None, angle=0.0, support=None, kernel_size=21):
    """Blurs by an isotropic (`sigma_y=None`) or anisotropic Gaussian; see `gaussian_kernel`.

    `support` defaults to the whole `kernel_size` window.
    """
    del key
    sigma_y = sigma_x if sigma_y is None else sigma_y
    support = kernel_size if support is None else support
    k = gaussian_kernel(
        sigma_x=sigma_x, sigma_y=sigma_y, angle=angle, support=support, kernel_size=kernel_size
    )
    return clip01(convolve(image, k))


@per_image
def motion_blur(key, image, *, length, angle=0.0, trajectory=False, kernel_size=31):
    """Blurs by a line kernel (`trajectory` false) or a random shake trajectory of `length` px.

    `trajectory` may be traced (one choice per image); both kernels are then built and one kept.
    """
    line = line_kernel(length=length, angle=angle, kernel_size=kernel_size)
    shake = trajectory_kernel(key, length=length, kernel_size=kernel_size)
    k = jnp.where(jnp.asarray(trajectory, bool), shake, line)
    return clip01(convolve(image, k))
