"""Additive and signal-dependent noise: Gaussian (colour, grey, correlated), Poisson, speckle."""

import jax
import jax.numpy as jnp

from ir_lora.degradations._util import clip01, per_image

COLOUR, GREY, CORRELATED = 0, 1, 2


def _mix_channels(key, z) -> jnp.ndarray:
    """Correlates the channels of unit-variance noise by a random mixing matrix.

    BSRGAN mixes channels with a random covariance but lets the variance drift from sigma; here the
    rows of the mixing matrix are normalised so every channel keeps unit variance.
    """
    c = z.shape[-1]
    mix = jax.random.normal(key, (c, c))
    mix = mix / jnp.maximum(jnp.linalg.norm(mix, axis=1, keepdims=True), 1e-6)
    # Full float32: TF32 on GPUs would skew the per-channel variance.
    return jnp.matmul(z, mix.T, precision=jax.lax.Precision.HIGHEST)


def gaussian_field(key, shape, kind) -> jnp.ndarray:
    """Unit-variance normal noise of `shape`, of the given `kind` (may be traced)."""
    k_z, k_mix = jax.random.split(key)
    return shape_noise(k_mix, jax.random.normal(k_z, shape), kind)


def shape_noise(key, z, kind) -> jnp.ndarray:
    """Turns an i.i.d. standard normal field `z` into colour, grey or correlated noise."""
    # Built from one field for all three kinds (only one is kept): a smaller, faster program.
    grey = jnp.broadcast_to(z[..., :1], z.shape)
    correlated = _mix_channels(key, z)
    kind = jnp.asarray(kind)
    return jnp.where(kind == GREY, grey, jnp.where(kind == CORRELATED, correlated, z))


def add_gaussian(image, z, sigma) -> jnp.ndarray:
    return clip01(image + jnp.asarray(sigma, jnp.float32) * z)


def add_poisson(image, z, scale) -> jnp.ndarray:
    """Shot noise from a standard normal field `z`: rounded Gaussian with the Poisson moments."""
    scale = jnp.maximum(jnp.asarray(scale, jnp.float32), 1e-3)
    lam = jnp.clip(image, 0.0, 1.0) * scale
    # jax.random.poisson samples by per-element rejection loops (about 20x slower here on 16 images
    # of 256x256). The rounded, non-negative Gaussian with the Poisson mean and variance keeps the
    # signal-dependent variance that matters for restoration and the program loop-free.
    counts = jnp.maximum(jnp.round(lam + jnp.sqrt(lam) * z), 0.0)
    return clip01(counts / scale)


def add_speckle(image, z, sigma) -> jnp.ndarray:
    return clip01(image * (1.0 + jnp.asarray(sigma, jnp.float32) * z))


@per_image
def gaussian_noise(key, image, *, sigma, kind=COLOUR):
    """Adds zero-mean Gaussian noise of standard deviation `sigma` (image units, [0, 1] scale).

    Args:
      key: PRNG key.
      image: `(H, W, C)` image in [0, 1].
      sigma: standard deviation per channel.
      kind: `COLOUR` (independent channels), `GREY` (one field shared by all channels) or
        `CORRELATED` (random channel mixing, same per-channel variance); may be traced.
    """
    return add_gaussian(image, gaussian_field(key, image.shape, kind), sigma)


@per_image
def poisson_noise(key, image, *, scale):
    """Shot noise, `Poisson(image * scale) / scale` (BSRGAN: scale = 10**U(2, 4)), approximated."""
    return add_poisson(image, jax.random.normal(key, image.shape), scale)


@per_image
def speckle_noise(key, image, *, sigma):
    """Multiplicative noise: `image * (1 + sigma * n)` with n standard normal."""
    return add_speckle(image, jax.random.normal(key, image.shape), sigma)
