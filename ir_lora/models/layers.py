"""Building blocks shared by the backbones.

`Conv` is `flax.linen.Conv` (same fields, parameter names, shapes and initialisers) whose
convolution primitive is picked per backend by one switch, `conv_form()`:

* `"cpu"` (the default on XLA:CPU): a 1x1 convolution becomes a 2-D matmul and a depthwise
  convolution becomes k*k shifted multiply-adds. XLA:CPU differentiates grouped convolutions
  about 13x slower than the shifted form (../shared/reference/STACK.md), and a 4-D 1x1 dot's
  kernel gradient is 3-5x slower than the 2-D matmul. Every other configuration goes to
  `lax.conv_general_dilated` unchanged.
* `"lax"` (the default on GPU and TPU): `lax.conv_general_dilated` itself, `feature_group_count`
  included, which those backends' convolution libraries run directly.

The default follows `jax.default_backend()`; `CONV_FORM` (module setting), the environment variable
`IR_LORA_CONV_FORM` (read when a convolution is traced) and the context manager `conv_form_scope`
override it, in the order scope, setting, variable. The form is read when a function is traced: a
function jitted under one form keeps it. Both forms give the same numbers (tests/test_layers.py,
1e-5). Because the module *is* an `nn.Conv`, adapters that target `nn.Conv` cover it as well.
"""

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
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


def _shifted_sum(xp: jnp.ndarray, kernel: jnp.ndarray, out_hw) -> jnp.ndarray:
    """`sum_ij xp[:, i:i+H', j:j+W', :] * kernel[i, j, 0]`: the depthwise "valid" correlation.

    Accumulates in float32 when the inputs are narrower (bf16), as a conv primitive does.
    """
    kh, kw = kernel.shape[:2]
    out_h, out_w = out_hw
    out_dtype = jnp.result_type(xp.dtype, kernel.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xp, weights = xp.astype(acc_dtype), kernel.astype(acc_dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i : i + out_h, j : j + out_w, :] * weights[i, j, 0]
            out = term if out is None else out + term
    return out.astype(out_dtype)


def _pad_hw(x: jnp.ndarray, pads) -> jnp.ndarray:
    # lax.pad takes negative pads (crops), which the transposed padding can need.
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def _valid_depthwise(xp, kernel):
    kh, kw = kernel.shape[:2]
    return _shifted_sum(xp, kernel, (xp.shape[1] - kh + 1, xp.shape[2] - kw + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_conv(x, kernel, pads):
    return _valid_depthwise(_pad_hw(x, pads), kernel)


def _depthwise_conv_fwd(x, kernel, pads):
    # Plain autodiff of the shifted sum keeps each of the k*k shifted slices of the input as a
    # residual (one activation-sized buffer per tap, benchmarks/NOTES.md M1). Here the padded
    # input is the only residual, and only when the kernel gradient needs it: a frozen kernel
    # (LoRA, AdaptIR) keeps nothing but the kernel itself.
    xp = _pad_hw(x.value, pads)
    y = _valid_depthwise(xp, kernel.value)
    return y, (xp if kernel.perturbed else None, kernel.value, x.perturbed, x.value.shape)


def _depthwise_conv_bwd(pads, residuals, g):
    xp, kernel, x_perturbed, x_shape = residuals
    kh, kw = kernel.shape[:2]
    dx = dkernel = None
    if x_perturbed:
        # The transpose of a correlation is the correlation of the padded cotangent with the
        # flipped kernel; this padding makes its output exactly the input's shape.
        transposed = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads))
        dx = _valid_depthwise(_pad_hw(g, transposed), kernel[::-1, ::-1]).astype(g.dtype)
    if xp is not None:
        # dkernel[i, j] = sum(xp * g placed at offset (i, j)). Slicing the input instead would
        # repeat the forward's slices, which XLA merges (CSE) and then keeps alive from the
        # forward to here, one activation-sized buffer per tap.
        out_h, out_w = g.shape[1:3]
        acc_dtype = jnp.promote_types(jnp.result_type(xp.dtype, g.dtype), jnp.float32)
        xp, g = xp.astype(acc_dtype), g.astype(acc_dtype)
        taps = []
        for i in range(kh):
            for j in range(kw):
                shift = ((i, xp.shape[1] - out_h - i), (j, xp.shape[2] - out_w - j))
                taps.append(jnp.sum(xp * _pad_hw(g, shift), axis=(0, 1, 2)))
        dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd, symbolic_zeros=True)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, pads) -> jnp.ndarray:
    """Depthwise convolution as a sum of shifted, per-channel scaled copies of the padded input.

    Differentiated by a custom VJP that saves only the input (and not even that for a frozen
    kernel) and computes both gradients with shifted multiply-adds as well.

    Args:
      x: `(N, H, W, C)` input.
      kernel: `(kh, kw, 1, C)` HWIO kernel with `feature_group_count == C`.
      pads: `((top, bottom), (left, right))` zero padding.

    Returns:
      The `(N, H', W', C)` output, equal to `lax.conv_general_dilated(..., feature_group_count=C)`.
    """
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _depthwise_conv(x, kernel, pads)


def pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, precision=None) -> jnp.ndarray:
    """1x1 convolution as one `(N*H*W, C_in) @ (C_in, C_out)` matmul."""
    n, h, w, c = x.shape
    y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, -1), precision=precision)
    return y.reshape(n, h, w, -1)


def cpu_conv_general_dilated(
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
    """`lax.conv_general_dilated` with XLA:CPU's fast forms: 1x1 as a 2-D matmul, depthwise
    as shifted multiply-adds."""
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


CONV_FORMS: dict[str, Callable[..., Any]] = {
    "cpu": cpu_conv_general_dilated,
    "lax": lax.conv_general_dilated,
}
CONV_FORM_ENV = "IR_LORA_CONV_FORM"
# None: the environment variable, else the backend's default (`default_conv_form`).
CONV_FORM: str | None = None
_scoped_forms: list[str] = []


def default_conv_form(backend: str | None = None) -> str:
    """The form for `backend` (default `jax.default_backend()`): "cpu" on CPU, else "lax"."""
    return "cpu" if (backend or jax.default_backend()) == "cpu" else "lax"


def _checked(form: str, source: str) -> str:
    if form not in CONV_FORMS:
        valid = sorted(CONV_FORMS)
        raise ValueError(f"{source}={form!r} is not a convolution form; valid: {valid}")
    return form


def conv_form() -> str:
    """The convolution form in effect: `conv_form_scope`, `CONV_FORM`, `$IR_LORA_CONV_FORM`
    ("auto" or unset: the backend's default), in that order."""
    if _scoped_forms:
        return _scoped_forms[-1]
    if CONV_FORM is not None:
        return _checked(CONV_FORM, "layers.CONV_FORM")
    env = os.environ.get(CONV_FORM_ENV, "auto")
    return default_conv_form() if env == "auto" else _checked(env, CONV_FORM_ENV)


@contextlib.contextmanager
def conv_form_scope(form: str):
    """Convolutions traced inside use `form` ("cpu" or "lax")."""
    _scoped_forms.append(_checked(form, "conv_form_scope"))
    try:
        yield
    finally:
        _scoped_forms.pop()


def fast_conv_general_dilated(*args, **kwargs):
    """Drop-in `lax.conv_general_dilated` in the form of `conv_form()` (module doc)."""
    return CONV_FORMS[conv_form()](*args, **kwargs)


class _FastConvGeneralDilated:
    """`nn.Conv.conv_general_dilated_cls` protocol: instances are called like the lax function."""

    def __call__(self, *args, **kwargs):
        return fast_conv_general_dilated(*args, **kwargs)


class Conv(nn.Conv):
    """`nn.Conv` whose convolution takes the backend's form (`conv_form()`, module doc)."""

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
