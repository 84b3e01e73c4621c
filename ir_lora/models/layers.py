"""Building blocks shared by the backbones.

`Conv` is `flax.linen.Conv` (same fields, parameter names, shapes and initialisers) whose
convolution primitive picks a form that XLA:CPU runs fast: a 1x1 convolution becomes a 2-D matmul
and a depthwise convolution becomes k*k shifted multiply-adds. XLA:CPU differentiates grouped
convolutions about 13x slower than the shifted form (../shared/reference/STACK.md), and a 4-D 1x1
dot's kernel gradient is 3-5x slower than the 2-D matmul. Every other configuration goes to
`lax.conv_general_dilated` unchanged. Because the module *is* an `nn.Conv`, adapters that target
`nn.Conv` cover it as well.
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, in_hw, kernel_hw) -> tuple[tuple[int, int], ...] | None:
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return None
        return tuple(lax.padtype_to_pads(in_hw, kernel_hw, (1,) * len(in_hw), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_unit(values) -> bool:
    return values is None or all(v == 1 for v in values)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, pads) -> jnp.ndarray:
    """Depthwise convolution as a sum of shifted, per-channel scaled copies of the padded input.

    Args:
      x: `(N, H, W, C)` input.
      kernel: `(kh, kw, 1, C)` HWIO kernel with `feature_group_count == C`.
      pads: `((top, bottom), (left, right))` zero padding.

    Returns:
      The `(N, H', W', C)` output, equal to `lax.conv_general_dilated(..., feature_group_count=C)`.
    """
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = xp.shape[1] - kh + 1
    out_w = xp.shape[2] - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i : i + out_h, j : j + out_w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, precision=None) -> jnp.ndarray:
    """1x1 convolution as one `(N*H*W, C_in) @ (C_in, C_out)` matmul."""
    n, h, w, c = x.shape
    y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, -1), precision=precision)
    return y.reshape(n, h, w, -1)


def fast_conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs,
):
    """Drop-in `lax.conv_general_dilated` with the fast special cases of the module doc."""
    simple = (
        lhs.ndim == 4
        and not kwargs
        and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and _is_unit(window_strides)
        and _is_unit(lhs_dilation)
        and _is_unit(rhs_dilation)
    )
    if simple:
        pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2])
        in_features, out_features = lhs.shape[-1], rhs.shape[-1]
        if (
            pads is not None
            and rhs.shape[:2] == (1, 1)
            and feature_group_count == 1
            and all(p == (0, 0) for p in pads)
        ):
            return pointwise_conv(lhs, rhs, precision)
        if (
            pads is not None
            and feature_group_count == in_features == out_features
            and rhs.shape[2] == 1
            and all(lo >= 0 and hi >= 0 for lo, hi in pads)
        ):
            return depthwise_conv(lhs, rhs, pads)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


class _FastConvGeneralDilated:
    """`nn.Conv.conv_general_dilated_cls` protocol: instances are called like the lax function."""

    def __call__(self, *args, **kwargs):
        return fast_conv_general_dilated(*args, **kwargs)


class Conv(nn.Conv):
    """`nn.Conv` with the fast XLA:CPU forms of 1x1 and depthwise convolutions."""

    conv_general_dilated_cls: Any = _FastConvGeneralDilated


def pixel_shuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
    """NHWC PixelShuffle with PyTorch's channel order `(C, r, r)`."""
    n, h, w, c = x.shape
    out_c = c // (factor * factor)
    x = x.reshape(n, h, w, out_c, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * factor, w * factor, out_c)


def pixel_unshuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
    """NHWC inverse of `pixel_shuffle` (PyTorch's PixelUnshuffle channel order)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, h // factor, w // factor, c * factor * factor)
