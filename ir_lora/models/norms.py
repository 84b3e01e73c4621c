"""Per-pixel channel LayerNorms of NAFNet and Restormer, with a closed-form backward.

Both backbones normalise each pixel over its channels (the last axis here, NHWC). Autodiff of the
forward formula makes XLA:CPU keep and re-read several intermediates and run more reductions
than the three the closed form needs (benchmarks/NOTES.md, E10), so the functions below have a
custom VJP, the one of NAFNet's official `LayerNormFunction` (megvii-research/NAFNet
`arch_util.py`), extended to Restormer's bias-free form. The residuals are the input and two
per-pixel statistics, not the normalised tensor: the backward recomputes `y` inside its fusion.

    y = (x - mean) * r,  r = 1 / sqrt(var + eps),  out = y * scale + bias        (`layer_norm`)
    out = x * r * scale                    (Restormer's BiasFree, `bias_free_layer_norm`)

The channel reductions (the two statistics and the backward's two per-pixel sums) take the form
of the backend through `layers.conv_form()`: on XLA:CPU ("cpu") each is a `(pixels, C) @ ones(C)`
matrix-vector product, which XLA:CPU runs as one vectorised dot instead of a reduction loop nest
over the short last axis (faster there, benchmarks/NOTES.md E10); elsewhere ("lax") `jnp.mean`.
Statistics are computed in at least float32; the output has the input's dtype.
`tests/models/test_norms.py` checks both forms' values and gradients against the plain formulas
to 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora.models import layers


def _channel_mean(t):
    """`jnp.mean(t, axis=-1, keepdims=True)`, as a matrix-vector product on XLA:CPU."""
    if layers.conv_form() != "cpu":
        return jnp.mean(t, axis=-1, keepdims=True)
    c = t.shape[-1]
    # HIGHEST: a backend that would run a default-precision dot in bf16 passes keeps float32.
    mean = jnp.dot(
        t.reshape(-1, c), jnp.full((c,), 1.0 / c, t.dtype), precision=jax.lax.Precision.HIGHEST
    )
    return mean.reshape(*t.shape[:-1], 1)


def _statistics(x, epsilon):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = _channel_mean(x)
    centred = x - mean
    # Two-pass variance, as both official models (and `use_fast_variance=False`).
    rstd = jax.lax.rsqrt(_channel_mean(centred * centred) + epsilon)
    return x, mean, rstd


def _sum_leading(t):
    return jnp.sum(t.reshape(-1, t.shape[-1]), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon):
    """`(x - mean) / sqrt(var + epsilon) * scale + bias` over the last axis."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    x32, mean, rstd = _statistics(x, epsilon)
    out = (x32 - mean) * rstd * scale + bias
    return out.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, grad):
    del epsilon
    x, mean, rstd, scale = residuals
    grad = grad.astype(rstd.dtype)
    y = (x.astype(rstd.dtype) - mean) * rstd
    g = grad * scale
    dx = rstd * (g - _channel_mean(g) - y * _channel_mean(g * y))
    d_scale = _sum_leading(grad * y).astype(scale.dtype)
    d_bias = _sum_leading(grad).astype(scale.dtype)
    return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bias_free_layer_norm(x, scale, epsilon):
    """`x / sqrt(var + epsilon) * scale` over the last axis (the mean is not subtracted)."""
    return _bias_free_fwd(x, scale, epsilon)[0]


def _bias_free_fwd(x, scale, epsilon):
    x32, mean, rstd = _statistics(x, epsilon)
    return (x32 * rstd * scale).astype(x.dtype), (x, mean, rstd, scale)


def _bias_free_bwd(epsilon, residuals, grad):
    del epsilon
    x, mean, rstd, scale = residuals
    grad = grad.astype(rstd.dtype)
    x32 = x.astype(rstd.dtype)
    y = x32 * rstd
    g = grad * scale
    # d/dx of the variance only sees the centred input: dx = r (g - (x - mean) r mean(g y)).
    dx = rstd * (g - (x32 - mean) * rstd * _channel_mean(g * y))
    return dx.astype(x.dtype), _sum_leading(grad * y).astype(scale.dtype)


bias_free_layer_norm.defvjp(_bias_free_fwd, _bias_free_bwd)


class LayerNorm(nn.Module):
    """Channel LayerNorm of the last axis, parameters `scale` (and `bias`) as `nn.LayerNorm`.

    Attributes:
      epsilon: added to the variance (NAFNet 1e-6, Restormer 1e-5).
      bias_free: Restormer's `BiasFree_LayerNorm`: no bias, and the output keeps the mean.
      param_dtype: dtype of the parameters.
    """

    epsilon: float = 1e-6
    bias_free: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        if self.bias_free:
            return bias_free_layer_norm(x, scale, self.epsilon)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon)
