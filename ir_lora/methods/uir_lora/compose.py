"""UIR-LoRA's per-image composition of N separately trained LoRAs on one frozen backbone.

Every adapted layer computes `y_n = f_0(x_n) + sum_i s[n, i] * scale * f_i(x_n)`, where `f_0` is
the frozen layer, `f_i(x) = x * dW_i` is LoRA i (`dW_i = reshape(A_i @ B_i)`, trained alone by
`method = lora` on degradation i's data) and `s` is one routing vector per image, shared by all
layers (`similarity_route`: top-K degradation similarities, renormalised).

The N LoRA trees share one `LoraConfig` (same targets and ranks), so they are stacked leaf by leaf
into `(N, ...)` factors, the expert layout of `ir_lora.peft.mixlora`, which does the work:

* `path="branches"`: the frozen layer plus the weighted low-rank branches (factored form).
* `path="merged"`: one kernel `W_n = W0 + scale * sum_i s[n, i] dW_i` per image, convolved with a
  vmap over the batch.

The stacked factors live in their own collection (`COLLECTION`) at the layers' paths, and the
composition attaches through the same interceptors as LoRA: the backbone code never changes.
With zero LoRAs the model is the frozen backbone.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from ir_lora.peft import intercept, mixlora
from ir_lora.peft import lora as lora_lib

COLLECTION = "stacked_lora"
PATHS = mixlora.PATHS


def stack(trees: Sequence[Any], names: Sequence[str] | None = None) -> dict:
    """Stacks N `"lora"` trees (same layers, same ranks) into one tree of `(N, ...)` factors.

    Args:
      trees: the `"lora"` collections of N runs (`{layer path...: {"lora_a", "lora_b"}}`).
      names: labels of the trees for error messages (default: their indices).

    Raises:
      ValueError: no trees, or a tree whose layers or factor shapes differ from the first's.
    """
    if not trees:
        raise ValueError("compose.stack: need at least one LoRA tree (zero LoRAs: use the base)")
    names = [str(n) for n in (names if names is not None else range(len(trees)))]
    flats = [traverse_util.flatten_dict(dict(tree)) for tree in trees]
    reference = {path: leaf.shape for path, leaf in flats[0].items()}
    for name, flat in zip(names[1:], flats[1:]):
        shapes = {path: leaf.shape for path, leaf in flat.items()}
        if shapes != reference:
            paths = set(shapes) | set(reference)
            differ = sorted("/".join(p) for p in paths if shapes.get(p) != reference.get(p))
            raise ValueError(
                f"compose.stack: LoRA {name!r} does not fit LoRA {names[0]!r} (same targets and "
                f"ranks needed); differing leaves: {differ[:5]}"
            )
    stacked = {path: jnp.stack([flat[path] for flat in flats]) for path in reference}
    return traverse_util.unflatten_dict(stacked)


def num_loras(stacked: Any) -> int:
    """N, the leading axis of a stacked tree."""
    return int(jax.tree.leaves(stacked)[0].shape[0])


def _wrapper(weights: jax.Array, scale: float, path: str) -> intercept.Wrapper:
    def wrapper(next_fun, args, kwargs, module):
        name = intercept.path_of(module)
        scope = module.scope
        if not scope.has_variable(COLLECTION, lora_lib.DOWN):
            raise ValueError(
                f"No stacked LoRA factors for layer {name!r} in the {COLLECTION!r} tree: the LoRAs "
                "were trained with a different LoraConfig than the one composing them"
            )
        down = scope.get_variable(COLLECTION, lora_lib.DOWN)
        up = scope.get_variable(COLLECTION, lora_lib.UP)
        x = args[0] if args else kwargs["inputs"]
        kernel = nn.unbox(module.get_variable("params", "kernel"))
        bias = nn.unbox(module.get_variable("params", "bias")) if module.use_bias else None
        if isinstance(module, nn.Conv):
            if path == "branches" and module.feature_group_count == 1:
                # The frozen layer keeps its own fast primitive; only the delta is added.
                y = next_fun(*args, **kwargs)
                delta = mixlora.conv_mixture_delta(
                    x,
                    down,
                    up,
                    weights,
                    kernel_shape=kernel.shape,
                    scale=scale,
                    **mixlora.conv_kwargs(module),
                )
                return y + delta.astype(y.dtype)
            return mixlora.mix_conv(
                x,
                kernel,
                down,
                up,
                weights,
                bias=bias,
                scale=scale,
                path=path,
                **mixlora.conv_kwargs(module),
            )
        return mixlora.mix_dense(x, kernel, down, up, weights, bias=bias, scale=scale, path=path)

    return wrapper


def rules(config: lora_lib.LoraConfig, weights: jax.Array, *, path: str = "branches"):
    """Interception rules: every layer `config` adapts gets the weighted sum of the N LoRAs."""
    if path not in PATHS:
        raise ValueError(f"compose: path must be one of {PATHS}, got {path!r}")
    return tuple(
        intercept.Rule(
            pattern,
            _wrapper(weights, config.scale(rank), path) if rank else None,
            module_types=lora_lib.SUPPORTED_TYPES,
        )
        for pattern, rank in config.targets
    )


def apply(
    model: nn.Module,
    params: Any,
    stacked: Any | None,
    weights: jax.Array,
    images: jax.Array,
    *,
    config: lora_lib.LoraConfig,
    path: str = "branches",
) -> jax.Array:
    """The backbone with the N LoRAs composed per image.

    Args:
      model: the backbone module.
      params: its frozen params.
      stacked: `stack(...)` of the N LoRA trees, or None for zero LoRAs (the backbone alone).
      weights: `(batch, N)` composition weights (rows of `similarity_route`).
      images: `(batch, H, W, 3)`.
      config: the `LoraConfig` the N LoRAs were trained with.
      path: "branches" or "merged" (module docstring).
    """
    batch = images.shape[0]
    n = 0 if stacked is None else num_loras(stacked)
    if weights.shape != (batch, n):
        raise ValueError(
            f"compose.apply: weights must be (batch, LoRAs) = ({batch}, {n}), got {weights.shape}"
        )
    if stacked is None:
        return model.apply({"params": params}, images)
    with intercept.attach(rules(config, weights, path=path)):
        return model.apply({"params": params, COLLECTION: stacked}, images)
