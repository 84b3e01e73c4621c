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
