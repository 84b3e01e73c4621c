"""LoRA for the `nn.Conv` and `nn.Dense` layers of any `flax.linen` model, attached from outside.

The adapter factors live in their own variable collection `"lora"`, beside the frozen
`"params"`, so the backbone and the adapters are separate pytrees (train, donate, checkpoint and
shard the small one only). For a layer with kernel `W0` the adapted layer computes
`y = x * W0 + b + scale * x * dW`, `dW = reshape(A @ B, W0.shape)`, `scale = alpha / r`:

* `nn.Dense`, kernel `(in, out)`: `A (in, r)`, `B (r, out)`.
* `nn.Conv`, HWIO kernel `(kh, kw, Cin/g, Cout)` (any kernel size, stride, padding, dilation and
  `feature_group_count` g, depthwise included): `A (kh*kw*Cin/g, r)`, `B (r, Cout)`, the
  LoCon / loralib ConvLoRA form (METHODS.md section 4). For a depthwise 3x3 this is the low-rank
  `(9, C)` matrix of the kernel. Subclasses of `nn.Conv` that only change the convolution
  primitive (`ir_lora.models.layers.Conv`) are covered and keep their fast primitive.

`A` is Kaiming-uniform (a=sqrt(5), bound 1/sqrt(fan_in) as loralib) from a key folded with the
layer's path, so no two layers share an init; `B` is zero, so the adapted model equals the base
model exactly at step 0.

Computation (training and `apply`): the layer runs once, with the kernel `W0 + scale * dW` formed in
the forward pass (`dW` is a tiny `kh*kw*Cin/g x Cout` product); autodiff then gives the factors'
gradients through the layer's kernel gradient. On XLA:CPU this is faster for every conv kind than
running a separate low-rank branch (benchmarks/NOTES.md: one fewer pass over the activations forward
and backward, and the skinny rank-r matmuls it replaces are memory bound), and it equals the base
model bit for bit while `B = 0`. Wide matmul layers (`uses_low_rank_backward`: the deep stages' 1x1
convs) keep that forward but take a custom backward that never forms the dense kernel gradient,
only the rank-r products (`_low_rank_layer`). Wrappers outside the adapted layer's own call see
one layer call; interceptors stacked *inside* the same layer call are bypassed (the layer is
re-applied with the merged kernel). `branch` keeps the explicit low-rank branch for wrappers that
weight several experts per sample: for g == 1 the layer itself with `Cout -> r` and kernel `A`
followed by a 2-D matmul `r -> Cout`, for g > 1 a conv with the delta kernel. `merge` folds `scale *
dW` into the kernels for inference; `unmerge` takes it out again.
"""

import dataclasses
import functools
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from flax.linen.dtypes import promote_dtype

from ir_lora.peft import intercept

COLLECTION = "lora"
DOWN, UP = "lora_a", "lora_b"
SUPPORTED_TYPES = (nn.Conv, nn.Dense)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which layers get LoRA, with which rank.

    Attributes:
      targets: ordered `(regex, rank)` pairs (or an ordered mapping regex -> rank) over
        "/"-joined module paths ("encoders_0/blocks_0/conv1"), matched with `re.fullmatch`;
        the first match wins and rank 0 means "no adapter" (an exception ahead of a broader
        rule). Stored as a tuple of pairs, so the config is hashable (a static jit argument).
      alpha: LoRA alpha; the branch is scaled by `alpha / rank`. None means scale 1 for every
        rank (alpha = r), so that ranks are comparable across layers.
    """

    targets: tuple[tuple[str, int], ...]
    alpha: float | None = None

    def __post_init__(self):
        items = self.targets.items() if isinstance(self.targets, Mapping) else self.targets
        targets = tuple((str(p), int(r)) for p, r in items)
        for pattern, rank in targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoraConfig target {pattern!r} is not a valid regex: {e}") from e
            if rank < 0:
                raise ValueError(f"LoraConfig target {pattern!r}: rank must be >= 0, got {rank}")
        patterns = [p for p, _ in targets]
        duplicates = sorted({p for p in patterns if patterns.count(p) > 1})
        if duplicates:
            raise ValueError(f"LoraConfig targets listed more than once: {duplicates}")
        if not targets:
            raise ValueError("LoraConfig needs at least one (regex, rank) target")
        object.__setattr__(self, "targets", targets)

    def scale(self, rank: int) -> float:
        """The branch multiplier `alpha / rank` (1 when alpha is None)."""
        return 1.0 if self.alpha is None else float(self.alpha) / rank


def factor_shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    """`(A shape, B shape)` for a Dense `(in, out)` or Conv `(*window, in/g, out)` kernel."""
    return (int(np.prod(kernel_shape[:-1])), rank), (rank, kernel_shape[-1])


def layer_key(rng: jax.Array, path: str) -> jax.Array:
    """The init key of the layer at `path`: `rng` folded with a stable hash of the path."""
    return jax.random.fold_in(rng, np.uint32(zlib.crc32(path.encode())))


def init_down(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Kaiming-uniform, a=sqrt(5) (torch/loralib): U(+-1/sqrt(fan_in)), fan_in = shape[-2].

    `shape` is `(fan_in, r)`, or `(E, fan_in, r)` for E experts (`ir_lora.peft.mixlora`).
    """
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def delta_kernel(down: jax.Array, up: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """`dW = reshape(A @ B, kernel_shape)` (C order: A's rows run over (kh, kw, Cin/g))."""
    return jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def matmul_last(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """`x @ w` over the last axis of `x`, as one 2-D matmul."""
    # 2-D matmul: XLA:CPU differentiates it 3-5x faster than a 4-D dot (STACK.md).
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, precision=precision)
    return y.reshape(x.shape[:-1] + (w.shape[-1],))


def branch(module: nn.Conv | nn.Dense, x: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    """The unscaled low-rank branch `x * reshape(A @ B)` of a bound `nn.Conv` / `nn.Dense`.

    For wrappers built on LoRA (mixtures of experts call it once per expert and weight the
    results per sample). `module` must be bound (inside an interceptor); only its configuration
    and its kernel's shape are used.
    """
    if isinstance(module, nn.Conv):
        kernel_shape = nn.unbox(module.get_variable("params", "kernel")).shape
        return _conv_branch(module, x, down, up, kernel_shape)
    if isinstance(module, nn.Dense):
        x, down, up = promote_dtype(x, down, up, dtype=module.dtype)
        return matmul_last(matmul_last(x, down, module.precision), up, module.precision)
    raise TypeError(f"LoRA supports nn.Conv and nn.Dense, not {type(module).__name__}")


def _conv_branch(module: nn.Conv, x, down, up, kernel_shape):
    # `module.clone` reuses the layer's padding, strides, dilations, mask and conv primitive; the
    # clones run unbound (own tiny apply) and must not be intercepted themselves.
    groups = module.feature_group_count
    with intercept.bypass():
        if groups == 1 and module.mask is None:
            h, up = promote_dtype(_narrow(module, x, down, kernel_shape), up, dtype=module.dtype)
            return matmul_last(h, up, module.precision)
        delta = module.clone(parent=None, name=None, use_bias=False)
        return delta.apply({"params": {"kernel": delta_kernel(down, up, kernel_shape)}}, x)


# A matmul layer takes the low-rank backward when its dense kernel gradient (`Cin x Cout` per
# pixel) costs this many times the rank-r one (`r (Cin + Cout)`): the skinny rank-r matmuls are
# memory bound, so they win only on wide layers; for windowed convs the narrow conv's kernel
# gradient did not pay (benchmarks/NOTES.md, E8).
LOW_RANK_BACKWARD_RATIO = 10


def uses_low_rank_backward(module: nn.Conv | nn.Dense, kernel_shape, rank: int) -> bool:
    """Whether the layer's factor gradients skip the dense kernel gradient (`_low_rank_layer`).

    Matmul layers (Dense; ungrouped, unmasked 1x1 convs with unit strides and dilations and no
    padding) whose `Cin * Cout` is at least `LOW_RANK_BACKWARD_RATIO * rank * (Cin + Cout)`.
    """
    if isinstance(module, nn.Conv) and not _is_pointwise(module, kernel_shape):
        return False
    fan_in, out = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
    return fan_in * out >= LOW_RANK_BACKWARD_RATIO * rank * (fan_in + out)


def _is_pointwise(module: nn.Conv, kernel_shape) -> bool:
    """Whether the conv is a matmul over the channel axis (`x @ W` per pixel)."""

    def unit(values):
        return values is None or all(v == 1 for v in np.atleast_1d(values))

    padding = module.padding
    unpadded = isinstance(padding, str) or not np.any(np.asarray(padding))  # 1x1: SAME pads 0
    return (
        module.feature_group_count == 1
        and module.mask is None
        and int(np.prod(kernel_shape[:-2])) == 1
        and unit(module.strides)
        and unit(module.input_dilation)
        and unit(module.kernel_dilation)
        and unpadded
    )


def _with_merged_kernel(module, x, down, up, scale, kernel):
    params = dict(module.variables["params"])
    if uses_low_rank_backward(module, kernel.shape, down.shape[-1]):
        bias = params.pop("bias", None)
        (x,) = promote_dtype(x, dtype=module.dtype or jnp.result_type(x, kernel))
        y = _low_rank_layer(
            x.reshape(-1, x.shape[-1]),
            kernel.reshape(-1, kernel.shape[-1]),
            down,
            up,
            jnp.asarray(scale, kernel.dtype),
            module.precision,
        ).reshape(x.shape[:-1] + (kernel.shape[-1],))
        return y if bias is None else y + bias.astype(y.dtype)
    delta = delta_kernel(down, up, kernel.shape) * scale
    params["kernel"] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
    with intercept.bypass():
        return module.clone(parent=None, name=None).apply({"params": params}, x)


def _narrow(module: nn.Conv | nn.Dense, x, down, kernel_shape):
    """`x * reshape(A)`: the layer (bound or not) with `r` outputs, kernel `A` and no bias."""
    rank = down.shape[-1]
    narrow = module.clone(parent=None, name=None, features=rank, use_bias=False)
    return narrow.apply({"params": {"kernel": down.reshape(kernel_shape[:-1] + (rank,))}}, x)


def _merged(kernel, down, up, scale):
    return kernel + (scale * delta_kernel(down, up, kernel.shape)).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _low_rank_layer(x, kernel, down, up, scale, precision):
    """`x @ (W0 + scale * A @ B)` for `x (pixels, Cin)`, differentiated without the dense kernel
    gradient.

    Forward: one matmul against `[W0 + scale A B | A]`, which also gives `h = x A` (r columns,
    kept for the backward). Backward: one matmul of the cotangent against `[merged^T | scale
    B^T]` gives the input gradient and `g_h = scale g B^T`; then `dB = scale h^T g` and `dA = x^T
    g_h`, so `x` and `g` are each read once more, by rank-r products (benchmarks/NOTES.md, E8 and
    E15). The frozen kernel's own gradient only when it is differentiated (full fine-tuning with
    LoRA). `x` is in the layer's compute dtype; the factor gradients are accumulated in float32.
    """
    return jnp.dot(x, _merged(kernel, down, up, scale).astype(x.dtype), precision=precision)


def _low_rank_layer_fwd(x, kernel, down, up, scale, precision):
    x_, kernel_, down_, up_, scale_ = (p.value for p in (x, kernel, down, up, scale))
    merged = _merged(kernel_, down_, up_, scale_)
    both = jnp.concatenate([merged, down_.astype(merged.dtype)], axis=1).astype(x_.dtype)
    y_h = jnp.dot(x_, both, precision=precision)
    y, h = y_h[:, : merged.shape[1]], y_h[:, merged.shape[1] :]
    return y, (x_, merged, h, down_, up_, scale_, kernel.perturbed, x.perturbed)


def _low_rank_layer_bwd(precision, residuals, g):
    x, merged, h, down, up, scale, kernel_perturbed, x_perturbed = residuals
    wide = jnp.promote_types(g.dtype, jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    up_t = (scale * up.T).astype(g.dtype)
    dx = None
    if x_perturbed:
        both = jnp.concatenate([merged.T.astype(g.dtype), up_t], axis=1)
        dx_gh = jnp.dot(g, both, precision=precision)
        dx, g_h = dx_gh[:, : merged.shape[0]], dx_gh[:, merged.shape[0] :]
    else:
        g_h = jnp.dot(g, up_t, precision=highest)
    d_up = scale * jnp.dot(h.T, g, precision=highest, preferred_element_type=wide)
    d_down = jnp.dot(x.T, g_h, precision=highest, preferred_element_type=wide)
    d_kernel = None
    if kernel_perturbed:
        # The layer is linear in its kernel, so W0's gradient is the merged kernel's.
        d_kernel = jnp.dot(x.T, g, precision=precision, preferred_element_type=wide)
        d_kernel = d_kernel.astype(merged.dtype)
    d_scale = None  # the scale is a constant of the config
    return dx, d_kernel, d_down.astype(down.dtype), d_up.astype(up.dtype), d_scale


_low_rank_layer.defvjp(_low_rank_layer_fwd, _low_rank_layer_bwd, symbolic_zeros=True)


def _wrapper(rank: int, scale: float, rng: jax.Array | None) -> intercept.Wrapper:
    def wrapper(next_fun, args, kwargs, module):
        # At init the layer's kernel exists only after its own call, so the first call runs the
        # layer and adds the branch; afterwards the layer runs once with the merged kernel.
        y = None if module.has_variable("params", "kernel") else next_fun(*args, **kwargs)
        path = intercept.path_of(module)
        kernel = nn.unbox(module.get_variable("params", "kernel"))
        shape_a, shape_b = factor_shapes(kernel.shape, rank)

        def make_down():
            if rng is None:
                raise ValueError(f"Creating LoRA factors for {path!r} needs an rng (init_lora)")
            return init_down(layer_key(rng, path), shape_a, kernel.dtype)

        scope = module.scope
        if not scope.is_mutable_collection(COLLECTION) and not scope.has_variable(COLLECTION, DOWN):
            raise ValueError(
                f"No LoRA factors for layer {path!r} in the {COLLECTION!r} tree: it was made with "
                "a different LoraConfig (re-run init_lora)."
            )
        down = intercept.variable(module, COLLECTION, DOWN, make_down)
        up = intercept.variable(module, COLLECTION, UP, jnp.zeros, shape_b, kernel.dtype)
        if down.shape != shape_a or up.shape != shape_b:
            raise ValueError(
                f"LoRA factors of layer {path!r} have shapes {down.shape}, {up.shape}; the "
                f"config asks rank {rank}: {shape_a}, {shape_b}."
            )
        x = args[0] if args else kwargs["inputs"]
        if y is None:
            return _with_merged_kernel(module, x, down, up, scale, kernel)
        return y + (scale * branch(module, x, down, up)).astype(y.dtype)

    return wrapper


def rules(config: LoraConfig, rng: jax.Array | None = None) -> tuple[intercept.Rule, ...]:
    """The interception rules of `config` (rank-0 targets become "leave alone" rules)."""
    return tuple(
        intercept.Rule(
            pattern,
            _wrapper(rank, config.scale(rank), rng) if rank else None,
            module_types=SUPPORTED_TYPES,
        )
        for pattern, rank in config.targets
    )


def interceptor(config: LoraConfig, rng: jax.Array | None = None):
    """Context in which `model.apply({"params": p, "lora": l}, ...)` runs the adapted model.

    Use it directly to combine LoRA with other collections or interceptors; `apply` is the
    short form. With `"lora"` mutable (`model.init`), the factors are created from `rng`.
    """
    return intercept.attach(rules(config, rng))


def init_lora(model: nn.Module, config: LoraConfig, rng: jax.Array, *sample_args, **sample_kwargs):
    """Creates the `"lora"` collection of `model` for `config`.

    Args:
      model: any `flax.linen` module.
      config: the targets and ranks.
      rng: key for the down factors; each layer uses `layer_key(rng, path)`.
      *sample_args: sample inputs (arrays or `jax.ShapeDtypeStruct`; only shapes are used).
      **sample_kwargs: further sample inputs; non-array values (`train=False`) pass unchanged.

    Returns:
      The `"lora"` pytree `{...module path...: {"lora_a": A, "lora_b": B}}`.

    Raises:
      ValueError: a target selected no layer (named), or the config adapts nothing.
      TypeError: a target selected a leaf layer (parameters, no sub-modules) that is neither
        nn.Conv nor nn.Dense, e.g. a LayerNorm (add a rank-0 exception before the target).
    """
    # Shapes come from an abstract init (no FLOPs, parameter values never computed); the factors
    # are then drawn here with the same per-layer keys the in-module initialiser uses.
    lora_rules = rules(config, rng)
    with intercept.attach(lora_rules) as trace:
        shapes = intercept.eval_shape_init(model, *sample_args, **sample_kwargs)
    trace.check_all_rules_used(lora_rules)
    if COLLECTION not in shapes:
        raise ValueError(f"LoraConfig {config.targets} adapts no layer (all selected ranks are 0)")
    spec = tuple(
        (names, leaf.shape, jnp.dtype(leaf.dtype).name)
        for names, leaf in traverse_util.flatten_dict(shapes[COLLECTION]).items()
    )
    return traverse_util.unflatten_dict(dict(zip((n for n, *_ in spec), _draw(rng, spec))))


@functools.partial(jax.jit, static_argnums=1)  # one compilation per model layout, not per factor
def _draw(rng, spec):
    return [
        init_down(layer_key(rng, "/".join(names[:-1])), shape, dtype)
        if names[-1] == DOWN
        else jnp.zeros(shape, dtype)
        for names, shape, dtype in spec
    ]


def apply(model: nn.Module, params, lora, config: LoraConfig, *args, **kwargs):
    """`model.apply({"params": params, "lora": lora}, *args, **kwargs)` with the adapters on.

    `kwargs` go to `model.apply`, so `rngs=`, `method=` and `mutable=` work as usual.
    """
    with interceptor(config):
        return model.apply({"params": params, COLLECTION: lora}, *args, **kwargs)


def _fold(params, lora, config: LoraConfig, sign: float):
    flat_params = traverse_util.flatten_dict(params)
    flat_lora = traverse_util.flatten_dict(lora)
    layers = {names[:-1] for names in flat_lora}
    out = dict(flat_params)
    for layer in sorted(layers):
        path = "/".join(layer)
        if (*layer, DOWN) not in flat_lora or (*layer, UP) not in flat_lora:
            raise ValueError(f"LoRA tree for layer {path!r} needs both {DOWN!r} and {UP!r}")
        kernel = flat_params.get((*layer, "kernel"))
        if kernel is None:
            raise ValueError(f"LoRA layer {path!r} has no kernel in params ('{path}/kernel')")
        down, up = flat_lora[(*layer, DOWN)], flat_lora[(*layer, UP)]
        scale = config.scale(down.shape[-1])
        delta = delta_kernel(down, up, kernel.shape) * scale
        out[(*layer, "kernel")] = (kernel + sign * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out)


def merge(params, lora, config: LoraConfig):
    """Params with `scale * dW` folded into every adapted kernel (for inference / export)."""
    return _fold(params, lora, config, 1.0)


def unmerge(merged, lora, config: LoraConfig):
    """Inverse of `merge`: the base params back (up to float rounding)."""
    return _fold(merged, lora, config, -1.0)


def ranks(lora) -> dict[str, int]:
    """`{layer path: rank}` of a `"lora"` pytree."""
    flat = traverse_util.flatten_dict(lora)
    return {"/".join(n[:-1]): int(v.shape[-1]) for n, v in flat.items() if n[-1] == DOWN}


def targets_from_ranks(layer_ranks: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """Exact-path targets (`re.escape`) for per-layer ranks, e.g. from CoLoRA's allocation."""
    return tuple((re.escape(path), int(r)) for path, r in layer_ranks.items())
