"""Pixel losses for image restoration: pure `f(pred, target) -> scalar` functions.

All losses take NHWC float arrays of equal shape and return the mean over every element (the
BasicSR default `reduction: mean`), so they are interchangeable in `train_lib`. Pick one by name
with `get(name)`; keyword options are bound with `functools.partial`.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_shapes(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error (BasicSR `L1Loss`)."""
    _check_shapes(pred, target)
    return jnp.mean(jnp.abs(pred - target))


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error (BasicSR `MSELoss`)."""
    _check_shapes(pred, target)
    return jnp.mean(jnp.square(pred - target))


def charbonnier(pred: jax.Array, target: jax.Array, *, eps: float = 1e-3) -> jax.Array:
    """Charbonnier loss `mean(sqrt((pred - target)^2 + eps^2))`.

    This is the Restormer/MPRNet form (`eps` squared inside the root, eps=1e-3); BasicSR's
    `CharbonnierLoss` adds `eps` unsquared with eps=1e-12, which is `charbonnier(eps=1e-6)` here.
    """
    _check_shapes(pred, target)
    return jnp.mean(jnp.sqrt(jnp.square(pred - target) + eps * eps))


def psnr_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """NAFNet's `PSNRLoss`: `10/ln(10) * mean_b log(mean_hwc (pred - target)^2 + 1e-8)`.

    Equals minus the mean per-image PSNR (in dB, for a peak of 1) up to the 1e-8 floor, so
    minimising it maximises PSNR. The first axis is the batch.
    """
    _check_shapes(pred, target)
    if pred.ndim < 2:
        raise ValueError(f"psnr_loss needs a leading batch axis, got shape {pred.shape}")
    per_image_mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    return (10.0 / math.log(10.0)) * jnp.mean(jnp.log(per_image_mse + 1e-8))


_LOSSES: dict[str, LossFn] = {
    "l1": l1,
    "mse": mse,
    "charbonnier": charbonnier,
    "psnr_loss": psnr_loss,
}


def get(name: str, **kwargs) -> LossFn:
    """Returns the loss called `name`, with keyword options (e.g. `eps`) bound.

    Raises:
      ValueError: if `name` is not a known loss.
    """
    if name not in _LOSSES:
        raise ValueError(f"Unknown loss {name!r}; known losses: {sorted(_LOSSES)}")
    fn = _LOSSES[name]
    return functools.partial(fn, **kwargs) if kwargs else fn
