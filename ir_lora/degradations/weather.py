"""Scene degradations: rain streaks, haze (atmospheric scattering) and low light."""

import jax
import jax.numpy as jnp

from ir_lora.degradations._util import clip01, convolve, per_image
from ir_lora.degradations.blur import line_kernel


@per_image
def rain(key, image, *, density, length, angle=0.0, brightness=0.4, kernel_size=41):
    """Adds synthetic rain streaks (the Rain100L / DegAE `add_rain` model).

    Sparse random drops are smeared by a line kernel into oriented streaks, then added to the
    image and clipped.

    Args:
      key: PRNG key.
      image: `(H, W, C)` image in [0, 1].
      density: fraction of pixels that seed a streak (e.g. 0.001-0.01).
      length: streak length in pixels, clipped to `kernel_size`.
      angle: streak tilt from vertical, radians (positive leans right going down).
      brightness: value added along a streak's axis.
      kernel_size: static size of the line-kernel window (odd).
    """
    streaks = rain_streaks(
        key, image.shape[:2], density=density, length=length, angle=angle, kernel_size=kernel_size
    )
    return add_rain(image, streaks, brightness)


def rain_streaks(key, hw, *, density, length, angle, kernel_size=41) -> jnp.ndarray:
    """`(H, W, 1)` streak layer in [0, 1], independent of the image (see `rain`)."""
    k_pos, k_val = jax.random.split(key)
    seeds = jax.random.uniform(k_pos, hw) < jnp.asarray(density, jnp.float32)
    drops = seeds * jax.random.uniform(k_val, hw, minval=0.5, maxval=1.0)
    line = line_kernel(length=length, angle=jnp.pi / 2 - angle, kernel_size=kernel_size)
    # line_kernel has unit sum; rescale so a streak is about as bright as its seed all along.
    line = line / jnp.maximum(line.max(), 1e-6)
    return jnp.clip(convolve(drops[:, :, None], line), 0.0, 1.0)


def add_rain(image, streaks, brightness) -> jnp.ndarray:
    return clip01(image + jnp.asarray(brightness, jnp.float32) * streaks)


def _smooth_field(key, h: int, w: int, grid: int = 5) -> jnp.ndarray:
    """A random smooth field in [0, 1]: bicubic upsampling of a coarse uniform grid."""
    coarse = jax.random.uniform(key, (grid, grid))
    field = jax.image.resize(coarse, (h, w), method="cubic")
    lo, hi = field.min(), field.max()
    return (field - lo) / jnp.maximum(hi - lo, 1e-6)


@per_image
def haze(key, image, *, beta, airlight, depth_mix=0.5):
    """Atmospheric scattering `I = J * t + A * (1 - t)`, `t = exp(-beta * depth)`.

    Args:
      key: PRNG key (draws the depth field).
      image: `(H, W, C)` clear image J in [0, 1].
      beta: scattering coefficient; depth is in [0, 1], so the thinnest transmission is
        `exp(-beta)`.
      airlight: atmospheric light A (grey).
      depth_mix: weight of the random smooth field against a top-far, bottom-near ramp (scenes
        are usually farther at the top).
    """
    h, w, _ = image.shape
    return add_haze(image, haze_depth(key, (h, w), depth_mix), beta, airlight)


def haze_depth(key, hw, depth_mix) -> jnp.ndarray:
    """`(H, W)` depth in [0, 1]: a top-far ramp mixed with a random smooth field."""
    h, w = hw
    ramp = jnp.linspace(1.0, 0.0, h)[:, None] * jnp.ones((1, w))
    mix = jnp.clip(jnp.asarray(depth_mix, jnp.float32), 0.0, 1.0)
    return (1.0 - mix) * ramp + mix * _smooth_field(key, h, w)


def add_haze(image, depth, beta, airlight) -> jnp.ndarray:
    t = jnp.exp(-jnp.maximum(jnp.asarray(beta, jnp.float32), 0.0) * depth)[:, :, None]
    return clip01(image * t + jnp.asarray(airlight, jnp.float32) * (1.0 - t))


@per_image
def low_light(key, image, *, gamma, gain, shot=0.01, read=0.01):
    """Darkens by a gamma and a gain, then adds signal-dependent (Poisson-Gaussian) noise.

    Args:
      key: PRNG key.
      image: `(H, W, C)` image in [0, 1].
      gamma: exponent (> 1 darkens mid-tones).
      gain: exposure multiplier (< 1 darkens).
      shot: noise variance per unit of signal, the shot (Poisson-like) part.
      read: standard deviation of the signal-independent read noise.
    """
    return darken(image, jax.random.normal(key, image.shape), gamma, gain, shot, read)


def darken(image, z, gamma, gain, shot, read) -> jnp.ndarray:
    """`low_light` given its standard normal field `z`."""
    dark = jnp.asarray(gain, jnp.float32) * jnp.power(
        jnp.clip(image, 0.0, 1.0), jnp.maximum(jnp.asarray(gamma, jnp.float32), 1e-3)
    )
    var = jnp.maximum(jnp.asarray(shot, jnp.float32), 0.0) * dark + jnp.asarray(read) ** 2
    return clip01(dark + jnp.sqrt(var) * z)
