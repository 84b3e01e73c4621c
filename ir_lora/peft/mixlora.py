"""Mixtures of low-rank experts for conv and dense layers, with per-sample routing weights.

One frozen layer `W0` carries E low-rank experts, and each sample n has its own weights `w[n, e]`:

    y_n = f(x_n; W0) + b + scale * sum_e w[n, e] f(x_n; dW_e),   dW_e = reshape(A_e @ B_e, W0.shape)

`A` is `(E, k_in, r)` with `k_in = kh*kw*Cin/g` (the rows run over `(kh, kw, Cin/g)` in C order) and
`B` is `(E, r, Cout)`: E factors of `ir_lora.peft.lora` stacked on a leading axis (HWIO kernels;
Dense kernels are `(Cin, Cout)`, i.e. `kh = kw = 1`), with its shapes, initialisation and delta
kernel. `B` starts at zero, so every expert starts as a no-op.

LoRA-IR (`loralib.ConvMixLoRA`) adapts every conv of its NAFNet with E=3 experts, r=8, alpha=16
(`scale = alpha / r = 2`) and hard top-1 routing from a frozen degradation classifier. Note that
loralib's conv LoRA has rank `r * k` for a k x k kernel; here the rank is what you pass. UIR-LoRA
composes one LoRA per degradation with weights from `similarity_route`.

Two execution paths compute the same thing (tests check agreement to 1e-5):
* `path="branches"`: the frozen layer plus the weighted expert branches. For dense layers and
  ungrouped convs the branches run in factored form (one conv to `E*r` channels, weight, one
  matmul); grouped convs run one conv per expert with the full `dW_e`.
* `path="merged"`: a per-sample kernel `W_n = W0 + scale * sum_e w[n, e] dW_e`, applied with a
  conv vmapped over the batch. Cheaper when the batch is small and the layer is large (inference).
Batch size 1 takes the same code as any other batch size (the official code skips LoRA for a
training batch of 1; this does not).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ir_lora.models import layers
from ir_lora.peft import lora

HIGHEST = lax.Precision.HIGHEST
ROUTE_MODES = ("soft", "topk", "top1")
PATHS = ("branches", "merged")


# ---------------------------------------------------------------------------------------------
# Factors


def factor_shapes(kernel_shape: Sequence[int], *, rank: int, num_experts: int):
    """`((E, k_in, r), (E, r, Cout))` for a Dense `(Cin, Cout)` or HWIO conv kernel shape."""
    down, up = lora.factor_shapes(tuple(int(s) for s in kernel_shape), rank)
    return (num_experts, *down), (num_experts, *up)


def init_factors(
    key: jax.Array,
    kernel_shape: Sequence[int],
    *,
    rank: int,
    num_experts: int,
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
    """`{"down": A, "up": B}`: A ~ U(+-1/sqrt(k_in)) (kaiming-uniform, a=sqrt 5), B = 0."""
    down_shape, up_shape = factor_shapes(kernel_shape, rank=rank, num_experts=num_experts)
    return {"down": lora.init_down(key, down_shape, dtype), "up": jnp.zeros(up_shape, dtype)}


def delta_kernels(down: jax.Array, up: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
    """The experts' kernels `(E, *kernel_shape)`, `dW_e = reshape(A_e @ B_e, kernel_shape)`."""
    _check_factors(down, up, kernel_shape)
    return jax.vmap(lambda a, b: lora.delta_kernel(a, b, tuple(kernel_shape)))(down, up)


def _check_factors(down, up, kernel_shape) -> None:
    want_down, want_up = factor_shapes(kernel_shape, rank=down.shape[-1], num_experts=down.shape[0])
    if down.shape != want_down or up.shape != want_up:
        raise ValueError(
            f"mixlora: factors down {down.shape} / up {up.shape} do not fit kernel "
            f"{tuple(kernel_shape)}: expected {want_down} / {want_up}"
        )


def _check_weights(weights, batch: int, num_experts: int) -> None:
    if weights.shape != (batch, num_experts):
        raise ValueError(
            f"mixlora: routing weights must be (batch, experts) = ({batch}, {num_experts}), "
            f"got {weights.shape}"
        )


# ---------------------------------------------------------------------------------------------
# Routing


def route(logits: jax.Array, *, mode: str = "soft", k: int | None = None) -> jax.Array:
    """Per-sample expert weights `(N, E)` from router logits `(N, E)`.

    Args:
      logits: router logits.
      mode: "soft" (softmax over all experts), "topk" (keep the k largest logits, softmax over
        them, exact zeros elsewhere; LoRA-IR's `topk` + `softmax`) or "top1" (one-hot argmax, the
        weights LoRA-IR's top_k=1 produces; no gradient reaches the logits).
      k: the number of experts kept by "topk".
    """
    if logits.ndim != 2:
        raise ValueError(f"route: logits must be (N, E), got shape {logits.shape}")
    num_experts = logits.shape[-1]
    if mode == "soft":
        return jax.nn.softmax(logits, axis=-1)
    if mode == "top1":
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_experts, dtype=logits.dtype)
    if mode == "topk":
        if k is None or not 1 <= k <= num_experts:
            raise ValueError(f"route: mode='topk' needs 1 <= k <= {num_experts}, got k={k}")
        return _softmax_over_top_k(logits, k)
    raise ValueError(f"route: mode must be one of {ROUTE_MODES}, got {mode!r}")


def _top_k_mask(scores: jax.Array, k: int) -> jax.Array:
    # Exactly k entries per row, also under ties (a threshold test could keep more).
    _, index = lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(index, scores.shape[-1], dtype=jnp.int32), axis=-2) > 0


def _softmax_over_top_k(scores: jax.Array, k: int) -> jax.Array:
    mask = _top_k_mask(scores, k)
    kept = jnp.where(mask, scores, -jnp.inf)
    return jnp.where(mask, jax.nn.softmax(kept, axis=-1), 0.0)


def cosine_similarity(embedding: jax.Array, prototypes: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`(N, K)` cosine similarities of embeddings `(N, D)` with prototypes `(K, D)`."""
    if embedding.ndim != 2 or prototypes.ndim != 2 or embedding.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"cosine_similarity: need embedding (N, D) and prototypes (K, D), got "
            f"{embedding.shape} and {prototypes.shape}"
        )
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
    return jnp.matmul(unit(embedding), unit(prototypes).T, precision=HIGHEST)


def similarity_route(
    embedding: jax.Array,
    prototypes: jax.Array,
    *,
    k: int,
    temperature: float = 0.01,
    normalize: str = "softmax",
) -> jax.Array:
    """UIR-LoRA's degradation-similarity composition `s = norm_K(topK(cos(e, P)))`, `(N, K)`.

    One prototype per degradation (UIR-LoRA: text embeddings of the degradation names from a
    frozen text tower; any `(K, D)` anchors work). The paper does not say what `norm_K` is, so
    both are offered:
    * "softmax" (default): softmax of `cos / temperature` over the top k, zeros elsewhere.
      temperature 0.01 is CLIP's logit scale of 100, the usual way CLIP similarities become
      probabilities.
    * "sum": the top-k similarities, clipped at 0, divided by their sum (equal weights 1/k if
      all of them are <= 0); temperature is not used.
    """
    if normalize not in ("softmax", "sum"):
        raise ValueError(
            f"similarity_route: normalize must be 'softmax' or 'sum', got {normalize!r}"
        )
    if not 1 <= k <= prototypes.shape[0]:
        raise ValueError(f"similarity_route: need 1 <= k <= {prototypes.shape[0]}, got k={k}")
    similarity = cosine_similarity(embedding, prototypes)
    if normalize == "softmax":
        return _softmax_over_top_k(similarity / temperature, k)
    mask = _top_k_mask(similarity, k)
    kept = jnp.where(mask, jnp.maximum(similarity, 0.0), 0.0)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    uniform = mask.astype(similarity.dtype) / k
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), uniform)


# ---------------------------------------------------------------------------------------------
# Layers


def _pairs(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"mixlora: {name} must be an int or a pair, got {value}")
    return value


def _padding(padding) -> Any:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"mixlora: padding {padding!r} is not supported (SAME, VALID, ints)")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides=1,
    padding="SAME",
    kernel_dilation=1,
    feature_group_count: int = 1,
) -> jax.Array:
    """NHWC x HWIO convolution with `nn.Conv`'s conventions (fast 1x1/depthwise forms)."""
    return layers.fast_conv_general_dilated(
        x,
        kernel,
        _pairs(strides, "strides"),
        _padding(padding),
        rhs_dilation=_pairs(kernel_dilation, "kernel_dilation"),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape, layers._NHWC),
        feature_group_count=feature_group_count,
        precision=HIGHEST,
    )


def conv_kwargs(module) -> dict[str, Any]:
    """The `mix_conv` keywords that reproduce a 2-D `flax.linen.Conv` (or `layers.Conv`)."""
    if module.input_dilation not in (None, 1, (1, 1)) or getattr(module, "mask", None) is not None:
        raise ValueError(f"mixlora: {module.name}: input_dilation and mask are not supported")
    return {
        "strides": module.strides if module.strides is not None else 1,
        "padding": module.padding,
        "kernel_dilation": module.kernel_dilation if module.kernel_dilation is not None else 1,
        "feature_group_count": module.feature_group_count,
    }


def _matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
    # 2-D matmul: XLA:CPU differentiates it 3-5x faster than an N-D dot (STACK.md).
    return lora.matmul_last(x, w, HIGHEST)


def conv_mixture_delta(
    x, down, up, weights, *, kernel_shape, scale: float = 1.0, **conv_config
) -> jax.Array:
    """`scale * sum_e w[:, e] * conv(x, dW_e)`: add it to the frozen conv's output."""
    num_experts, _, rank = down.shape
    _check_factors(down, up, kernel_shape)
    _check_weights(weights, x.shape[0], num_experts)
    weights = weights.astype(x.dtype)
    if conv_config.get("feature_group_count", 1) == 1:
        # Factored: conv to E*r channels, weight each expert's r channels, then one matmul.
        narrow = down.transpose(1, 0, 2).reshape((*kernel_shape[:-1], num_experts * rank))
        hidden = conv(x, narrow.astype(x.dtype), **conv_config)
        hidden = hidden.reshape((*hidden.shape[:-1], num_experts, rank))
        hidden = hidden * weights[:, None, None, :, None]
        out = _matmul_last(hidden.reshape((*hidden.shape[:-2], -1)), up.reshape(-1, up.shape[-1]))
        return scale * out
    return _delta_branches(x, delta_kernels(down, up, kernel_shape), weights, scale, conv_config)


def _delta_branches(x, deltas, weights, scale, conv_config):
    deltas = deltas.astype(x.dtype)
    out = sum(
        weights[:, e, None, None, None] * conv(x, deltas[e], **conv_config)
        for e in range(deltas.shape[0])
    )
    return scale * out


def dense_mixture_delta(x, down, up, weights, *, scale: float = 1.0) -> jax.Array:
    """`scale * sum_e w[:, e] * (x @ A_e @ B_e)` for x `(N, ..., Cin)`."""
    num_experts, cin, rank = down.shape
    if x.shape[-1] != cin:
        raise ValueError(f"mixlora: dense input {x.shape} does not end in Cin = {cin}")
    _check_factors(down, up, (cin, up.shape[-1]))
    _check_weights(weights, x.shape[0], num_experts)
    hidden = _matmul_last(x, down.transpose(1, 0, 2).reshape(cin, num_experts * rank))
    hidden = hidden.reshape((*hidden.shape[:-1], num_experts, rank))
    hidden = hidden * weights.astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1, 1))
    out = _matmul_last(hidden.reshape((*hidden.shape[:-2], -1)), up.reshape(-1, up.shape[-1]))
    return scale * out


def merged_kernels(kernel, down, up, weights, *, scale: float = 1.0) -> jax.Array:
    """Per-sample kernels `(N, *kernel.shape)`: `W_n = W0 + scale * sum_e w[n, e] dW_e`."""
    return _merge(kernel, delta_kernels(down, up, kernel.shape), weights, scale)


def _merge(kernel, deltas, weights, scale):
    _check_weights(weights, weights.shape[0], deltas.shape[0])
    mixed = jnp.tensordot(weights.astype(deltas.dtype), deltas, axes=1, precision=HIGHEST)
    return kernel[None] + scale * mixed


def mix_conv(
    x: jax.Array,
    kernel: jax.Array,
    down: jax.Array,
    up: jax.Array,
    weights: jax.Array,
    *,
    bias: jax.Array | None = None,
    scale: float = 1.0,
    path: str = "branches",
    **conv_config,
) -> jax.Array:
    """A conv with a mixture of low-rank experts, `(N, H, W, Cin) -> (N, H', W', Cout)`.

    Args:
      x: NHWC input.
      kernel: the frozen HWIO kernel `W0`.
      down, up: the experts' factors `(E, k_in, r)` and `(E, r, Cout)`.
      weights: routing weights `(N, E)` (`route`, `similarity_route`).
      bias: the frozen bias `(Cout,)` or None.
      scale: the branch multiplier (alpha / r; LoRA-IR: 2).
      path: "branches" or "merged" (module docstring).
      **conv_config: strides, padding, kernel_dilation, feature_group_count (`conv_kwargs`).
    """
    groups = conv_config.get("feature_group_count", 1)
    if path == "branches" and groups == 1:
        y = conv(x, kernel, **conv_config)
        y = y + conv_mixture_delta(
            x, down, up, weights, kernel_shape=kernel.shape, scale=scale, **conv_config
        )
        return y if bias is None else y + bias
    deltas = delta_kernels(down, up, kernel.shape)
    return mix_conv_deltas(
        x, kernel, deltas, weights, bias=bias, scale=scale, path=path, **conv_config
    )


def mix_conv_deltas(
    x: jax.Array,
    kernel: jax.Array,
    deltas: jax.Array,
    weights: jax.Array,
    *,
    bias: jax.Array | None = None,
    scale: float = 1.0,
    path: str = "branches",
    **conv_config,
) -> jax.Array:
    """`mix_conv` with full expert kernels `deltas (E, *kernel.shape)` (e.g. `from_loralib`)."""
    if deltas.shape[1:] != kernel.shape:
        raise ValueError(f"mixlora: deltas {deltas.shape} must be (E, *{kernel.shape})")
    _check_weights(weights, x.shape[0], deltas.shape[0])
    if path == "branches":
        y = conv(x, kernel, **conv_config) + _delta_branches(x, deltas, weights, scale, conv_config)
    elif path == "merged":
        kernels = _merge(kernel, deltas, weights, scale).astype(x.dtype)
        y = jax.vmap(lambda xn, kn: conv(xn[None], kn, **conv_config)[0])(x, kernels)
    else:
        raise ValueError(f"mix_conv: path must be one of {PATHS}, got {path!r}")
    return y if bias is None else y + bias


def from_loralib(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
    """LoRA-IR's `ConvMixLoRA` expert factors to HWIO expert kernels `(E, *kernel_shape)`.

    The official factors are `lora_A (E, r*k, Cin*k)` and `lora_B (E, Cout/g*k, r*k)` with
    `dW_e = (B_e @ A_e).view(Cout, Cin/g, k, k)` (OIHW; times alpha/r at use, pass it as
    `scale`). That view mixes rows and columns, so `dW_e` is not rank r in this module's
    `(k_in, Cout)` layout: load released experts as full kernels and use `mix_conv_deltas`.
    """
    kh, kw, cin_g, cout = kernel_shape
    product = jnp.matmul(lora_b, lora_a, precision=HIGHEST)
    if product.size != lora_a.shape[0] * kh * kw * cin_g * cout:
        raise ValueError(
            f"from_loralib: B @ A {product.shape} cannot be viewed as kernel {tuple(kernel_shape)}"
        )
    oihw = product.reshape(lora_a.shape[0], cout, cin_g, kh, kw)
    return oihw.transpose(0, 3, 4, 2, 1)


def mix_dense(
    x: jax.Array,
    kernel: jax.Array,
    down: jax.Array,
    up: jax.Array,
    weights: jax.Array,
    *,
    bias: jax.Array | None = None,
    scale: float = 1.0,
    path: str = "branches",
) -> jax.Array:
    """A Dense layer `(Cin, Cout)` with a mixture of low-rank experts on `(N, ..., Cin)` input."""
    if path == "branches":
        y = _matmul_last(x, kernel) + dense_mixture_delta(x, down, up, weights, scale=scale)
    elif path == "merged":
        _check_weights(weights, x.shape[0], down.shape[0])
        kernels = merged_kernels(kernel, down, up, weights, scale=scale).astype(x.dtype)
        y = jax.vmap(_matmul_last)(x, kernels)
    else:
        raise ValueError(f"mix_dense: path must be one of {PATHS}, got {path!r}")
    return y if bias is None else y + bias
