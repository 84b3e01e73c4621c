"""Per-parameter contributions of a pre-trained network to a new task, and their reductions.

CoLoRA sizes each layer's LoRA rank by how much the layer contributes to the new task, measured
with FAIG (Filter Attribution based on Integral Gradient; Xie et al., TencentARC/FAIG
`analysis/tools/srresnet/faig.py`). Along the straight path between the pre-trained weights
`base` and a briefly fully fine-tuned copy `tuned`,

    theta(alpha) = alpha * base + (1 - alpha) * tuned,   alpha_s = s / M,  s = 0..M-1,

the integrated gradient of scalar parameter j on one image is

    IG_j = | (base_j - tuned_j) * (1/M) * sum_s dL(theta(alpha_s)) / dtheta_j |,

and FAIG averages it over the task's images (the official code takes the absolute value per
image, then averages). `faig` returns IG for every parameter (kernels, biases, norms, and other
variables alike) with the params' tree structure; `per_filter` and `layer_scores` reduce it.
`grad_norm` is the cheap alternative that needs no fine-tuned copy.

Everything that touches parameters is one jitted program: no host loop over layers or steps,
so it runs sharded exactly like a training step when `batches` is a global array.
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LossFn = Callable[[Any, Any], jax.Array]

# Ordered (regex, group) over "/"-joined parameter paths, first `re.fullmatch` wins: the parameter
# groups of the CoLoRA paper's real_fig3 table (Conv / Bias / Norm / Variables).
PARAM_GROUPS: tuple[tuple[str, str], ...] = (
    (r"(?i)(.*/)?[^/]*norm[^/]*/(scale|bias)", "Norm"),
    (r"(.*/)?kernel", "Conv"),
    (r"(.*/)?bias", "Bias"),
    (r".*", "Variables"),
)

# Ordered (regex, stage) over parameter paths, first `re.match` (anchored at the start) wins:
# the U-Net stages of NAFNet (`ir_lora.models.nafnet`) and Restormer (`ir_lora.models.restormer`).
STAGES: tuple[tuple[str, str], ...] = (
    (r"(intro|encoders_\d+|downs_\d+)/", "encoder"),
    (r"middle_blks/", "middle"),
    (r"(ups_\d+|decoders_\d+|ending)/", "decoder"),
    (r"(patch_embed|encoder_level\d+|down\d+_\d+)/", "encoder"),
    (r"latent/", "middle"),
    (r"(up\d+_\d+|reduce_chan_level\d+|decoder_level\d+|refinement|output)/", "decoder"),
)

# `re.match` of a parameter path gives its block: a stage's `blocks_j`, else the top-level module.
BLOCK_PATTERN = r"[^/]+/blocks_\d+(?=/)|[^/]+(?=/)"


def sum_squared_error(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    *,
    input_key: str = "lq",
    target_key: str = "gt",
) -> LossFn:
    """FAIG's task loss, `MSELoss(reduction='sum')`: `sum((apply_fn(params, lq) - gt) ** 2)`.

    Args:
      apply_fn: `(params, images) -> restored images`, e.g.
        `lambda p, x: model.apply({"params": p}, x)`.
      input_key: batch key of the degraded images.
      target_key: batch key of the clean images.

    Returns:
      `loss_fn(params, batch) -> scalar` for `faig` and `grad_norm`.
    """

    def loss_fn(params, batch):
        restored = apply_fn(params, batch[input_key])
        return jnp.sum(jnp.square(restored.astype(jnp.float32) - batch[target_key]))

    return loss_fn


def _batch_count(batches) -> tuple[int, int]:
    shapes = {tuple(x.shape[:2]) for x in jax.tree.leaves(batches)}
    if not shapes or any(len(s) < 2 for s in shapes) or len(shapes) != 1:
        raise ValueError(
            "faig/grad_norm: every leaf of `batches` needs the same leading (num_batches, "
            f"batch_size) axes, got leading shapes {sorted(shapes)}"
        )
    return shapes.pop()


def _f32_zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps", "per_image"))
def faig(
    loss_fn: LossFn,
    base_params,
    tuned_params,
    batches,
    *,
    steps: int = 100,
    per_image: bool = True,
):
    """FAIG integrated gradients of every parameter, averaged over the task's images.

    Args:
      loss_fn: `(params, batch) -> scalar` task loss; FAIG uses `sum_squared_error`. With
        `per_image` it is called on single-image batches (leading axis 1).
      base_params: pre-trained params (theta-bar, the path's end at alpha = 1).
      tuned_params: the fine-tuned params (theta, alpha = 0), same structure.
      batches: pytree whose leaves are `(num_batches, batch_size, ...)`, e.g. `{"lq", "gt"}`
        stacked batches; may be sharded along `batch_size` like a training batch.
      steps: M, the Riemann steps (the official code uses 100; 20-32 is usually enough).
      per_image: True (official) takes `|.|` per image, then averages over all images; the
        images are visited one at a time (batch of 1). False takes it per batch of the summed
        loss and averages over batches: whole batches, parallel across devices, much faster.

    Returns:
      float32 |IG| with the params' tree structure, averaged over images (or batches).
    """
    if jax.tree.structure(base_params) != jax.tree.structure(tuned_params):
        raise ValueError("faig: base_params and tuned_params have different tree structures")
    num_batches, batch_size = _batch_count(batches)
    if per_image:
        # One image per scan step. A vmap over the images would be faster, but XLA's SPMD
        # partitioner gets the per-example conv kernel gradient (a batch-grouped conv) wrong when
        # the image axis is sharded: silently wrong values with jax 0.10.2 on 8 CPU devices (cf.
        # jax-ml/jax#32157, vmap(grad) of a conv on sharded inputs).
        batches = jax.tree.map(
            lambda x: x.reshape((num_batches * batch_size, 1) + x.shape[2:]), batches
        )
    grad_fn = jax.grad(loss_fn)

    base32 = jax.tree.map(lambda x: x.astype(jnp.float32), base_params)
    tuned32 = jax.tree.map(lambda x: x.astype(jnp.float32), tuned_params)
    variation = jax.tree.map(jnp.subtract, base32, tuned32)

    def on_path(alpha):
        # Evaluated in the params' own dtype, as the network is run in training.
        return jax.tree.map(
            lambda b, t, p: (alpha * b + (1.0 - alpha) * t).astype(p.dtype),
            base32,
            tuned32,
            base_params,
        )

    def one_batch(total, batch):
        def one_step(acc, s):
            g = grad_fn(on_path(s.astype(jnp.float32) / steps), batch)
            return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g), None

        acc, _ = jax.lax.scan(one_step, _f32_zeros(base_params), jnp.arange(steps))
        ig = jax.tree.map(lambda d, a: jnp.abs(d * (a / steps)), variation, acc)
        return jax.tree.map(jnp.add, total, ig), None

    total, _ = jax.lax.scan(one_batch, _f32_zeros(base_params), batches)
    count = num_batches * batch_size if per_image else num_batches
    return jax.tree.map(lambda t: t / count, total)


@functools.partial(jax.jit, static_argnames=("loss_fn", "rms"))
def grad_norm(loss_fn: LossFn, params, batches, *, rms: bool = False):
    """Mean per-leaf gradient norm at the pre-trained point, the contribution without a fine-tune.

    Args:
      loss_fn: `(params, batch) -> scalar` task loss.
      params: the pre-trained params.
      batches: pytree with `(num_batches, batch_size, ...)` leaves.
      rms: divide each leaf's L2 norm by sqrt(its size), so large layers do not win by size.

    Returns:
      A float32 scalar per leaf (params' structure): the L2 norm of the leaf's gradient,
      averaged over the batches.
    """
    num_batches, _ = _batch_count(batches)

    def one_batch(total, batch):
        g = jax.grad(loss_fn)(params, batch)

        def norm(x):
            n = jnp.linalg.norm(x.astype(jnp.float32).ravel())
            return n / np.sqrt(max(x.size, 1)) if rms else n

        return jax.tree.map(lambda t, x: t + norm(x), total, g), None

    zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    total, _ = jax.lax.scan(one_batch, zeros, batches)
    return jax.tree.map(lambda t: t / num_batches, total)


def _filter_sums(x: np.ndarray, filter: str) -> np.ndarray:
    x = np.abs(np.asarray(x, np.float64))
    if x.ndim < 2:  # biases, norms, variables: every scalar is its own filter
        return x.reshape(-1)
    if filter == "output":
        return x.reshape(-1, x.shape[-1]).sum(axis=0)
    if filter == "kernel_slice":  # the official code's (C_out, C_in) slices, each (kh, kw)
        return x.reshape(-1, x.shape[-2] * x.shape[-1]).sum(axis=0)
    raise ValueError(f"filter must be 'output' or 'kernel_slice', got {filter!r}")


def per_filter(ig_tree, *, filter: str = "output"):
    """Sum of |IG| over each filter of each leaf (FAIG's filter score), on the host.

    Args:
      ig_tree: `faig` output (or any tree of per-parameter scores).
      filter: "output": a filter is a kernel's output-channel slice, `(Cout,)` per kernel;
        "kernel_slice": one `(kh, kw)` slice per (input, output) channel pair, as the official
        FAIG code's `reshape(-1, 3, 3)`, `(Cin/g * Cout,)` per kernel. Leaves of rank < 2 (biases,
        norms, variables) count every scalar as a filter.

    Returns:
      A tree of 1-D float64 numpy arrays with the input's structure.
    """
    return jax.tree.map(lambda x: _filter_sums(x, filter), jax.device_get(ig_tree))


def _first(rules: Sequence[tuple[str, str]], path: str, match=re.fullmatch) -> str | None:
    return next((name for pattern, name in rules if match(pattern, path)), None)


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """Contributions reduced per layer, parameter group, block and stage.

    Attributes:
      layers: module path ("encoders_0/blocks_0/conv1") -> score, for every adaptable layer
        (every `kernel` leaf), in path order (jax flattens dicts by sorted key; see
        `plot.call_order` for the forward order). These size the LoRA ranks.
      leaves: parameter path ("encoders_0/blocks_0/conv1/bias") -> score, every leaf.
      groups: parameter group (Conv / Bias / Norm / Variables) -> score over all its leaves.
      blocks: block ("encoders_0/blocks_1", "intro") -> score over all its leaves.
      stages: stage (encoder / middle / decoder / other) -> score over all its leaves.
      block_stage: block -> its stage, for colour-coding the per-block chart.
    """

    layers: dict[str, float]
    leaves: dict[str, float]
    groups: dict[str, float]
    blocks: dict[str, float]
    stages: dict[str, float]
    block_stage: dict[str, str]


def layer_scores(
    ig_tree,
    *,
    reduce: str = "mean_filter",
    filter: str = "output",
    param_groups: Sequence[tuple[str, str]] = PARAM_GROUPS,
    stages: Sequence[tuple[str, str]] = STAGES,
    block_pattern: str = BLOCK_PATTERN,
) -> LayerScores:
    """Reduces per-parameter contributions to per-layer, per-group, per-block and per-stage scores.

    Every set of leaves (one layer, a group, a block) is reduced pooled over its members, so
    layers and sets of different size compare fairly.

    Args:
      ig_tree: `faig` output, or `grad_norm` output (one scalar per leaf, which is its own
        score under every `reduce`).
      reduce: "mean_filter" (recommended, METHODS.md 5.1): mean of the filter sums of |IG|;
        "mean": mean |IG| per scalar; "sum": total |IG|.
      filter: what a filter is, see `per_filter`.
      param_groups: ordered (regex, group) over parameter paths, first `re.fullmatch` wins.
      stages: ordered (regex, stage) over parameter paths, first `re.match` wins, else "other".
      block_pattern: regex whose `re.match` on a parameter path is the path's block; a path it
        does not match is its own block.

    Returns:
      A `LayerScores`.
    """
    if reduce not in ("mean_filter", "mean", "sum"):
        raise ValueError(f"reduce must be 'mean_filter', 'mean' or 'sum', got {reduce!r}")
    flat = traverse_util.flatten_dict(jax.device_get(ig_tree), sep="/")
    # Per set of leaves: (sum of |IG|, number of filters, number of scalars).
    stats: dict[tuple[str, str], np.ndarray] = {}
    leaves, layers, block_stage = {}, {}, {}

    def add(key, value):
        stats[key] = stats.get(key, np.zeros(3)) + value

    for path, x in flat.items():
        x = np.asarray(x)
        sums = _filter_sums(x, filter)
        value = np.array([sums.sum(), sums.size, max(x.size, 1)], np.float64)
        group = _first(param_groups, path) or "other"
        stage = _first(stages, path, re.match) or "other"
        found = re.match(block_pattern, path)
        block = found.group(0) if found else path
        block_stage.setdefault(block, stage)
        leaves[path] = _reduce(value, reduce)
        if path.rsplit("/", 1)[-1] == "kernel":
            layers[path.rsplit("/", 1)[0]] = leaves[path]
        add(("group", group), value)
        add(("block", block), value)
        add(("stage", stage), value)

    def collect(kind):
        return {name: _reduce(v, reduce) for (k, name), v in stats.items() if k == kind}

    return LayerScores(
        layers=layers,
        leaves=leaves,
        groups=collect("group"),
        blocks=collect("block"),
        stages=collect("stage"),
        block_stage=block_stage,
    )


def _reduce(value: np.ndarray, reduce: str) -> float:
    total, filters, scalars = value
    if reduce == "sum":
        return float(total)
    return float(total / (filters if reduce == "mean_filter" else scalars))
