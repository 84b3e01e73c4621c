"""Shared set-up of the benchmarks: models with random weights, the fine-tuning methods, timing.

The methods are built through the method registry (`ir_lora.methods.build`) from the configs a
user runs (`configs/common.py: training_config`):

* `full`: every parameter trains.
* `lora`: rank `r` on every dense convolution (1x1, 3x3, the strided down/up-sampling convs),
  depthwise kernels frozen (explicit `lora.targets`); biases, norms and residual scales train
  (`lora.tune_bias_norm`).
* `colora`: the same layers with a fixed non-uniform rank map (`colora_ranks`): higher ranks near
  the input and the output, about the same number of adapter parameters as `lora`; CoLoRA is
  LoRA with per-layer targets, so it is built as `lora` with those targets.
* `adaptir`: AdaptIR beside every block's feed-forward path, as `method = "adaptir"` builds it
  with the default `adaptir` section.

Weights are random (drawn with numpy from the parameter shapes: no XLA compilation of the
initialisers), scaled like a trained network so no value underflows to denormals.
"""

import contextlib
import dataclasses
import math
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from configs import common as configs_common
from ir_lora import losses, methods, train_lib
from ir_lora.methods import lora as lora_method
from ir_lora.models import build, nafnet
from ir_lora.peft import intercept, lora

METHODS = ("full", "lora", "colora", "adaptir")
OPTIMIZER = {"lr": 1e-4, "weight_decay": 0.0}


def random_params(shapes, seed: int = 0) -> dict:
    """Parameters of the given shapes: kernels ~ N(0, 1/fan_in), norms 1, residual scales 0.1."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for names, leaf in flat.items():
        name = names[-1]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
        elif name == "scale" or name == "temperature":
            value = np.ones(leaf.shape)
        elif name in ("beta", "gamma"):
            value = np.full(leaf.shape, 0.1)
        else:
            value = rng.normal(0.0, 0.01, leaf.shape)
        out[names] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def conv_layers(model, sample) -> dict[str, tuple[int, ...]]:
    """`{path: kernel shape}` of the dense (not depthwise) convolutions, in execution order."""
    shapes = traverse_util.flatten_dict(intercept.eval_shape_init(model, sample)["params"])
    order = intercept.module_paths(model, sample)
    out = {}
    for path in order:
        kernel = shapes.get((*path.split("/"), "kernel"))
        if kernel is None or kernel.ndim != 4:
            continue
        depthwise = kernel.shape[2] == 1 and kernel.shape[3] > 1
        if not depthwise:
            out[path] = tuple(kernel.shape)
    return out


def adapter_size(kernel_shape: tuple[int, ...], rank: int) -> int:
    """Scalars of the LoRA factors of one kernel at `rank`."""
    (k, _), (_, d) = lora.factor_shapes(kernel_shape, rank)
    return rank * (k + d)


def colora_ranks(layers: dict[str, tuple[int, ...]], rank: int) -> dict[str, int]:
    """A fixed non-uniform rank map with about the adapter size of uniform `rank`.

    Layer i of n (execution order) gets weight `1 + 3 * (2 t - 1)^2`, `t = i / (n - 1)`: four
    times the middle's near the input and the output, the shape of CoLoRA's contribution profile
    (METHODS.md section 5). Ranks are `max(1, round(s * weight))` with `s` bisected so the total
    matches `rank` on every layer.
    """
    paths = list(layers)
    n = len(paths)
    weights = [1 + 3 * (2 * i / max(n - 1, 1) - 1) ** 2 for i in range(n)]
    target = sum(adapter_size(layers[p], rank) for p in paths)

    def ranks_at(scale):
        return {p: max(1, round(scale * w)) for p, w in zip(paths, weights)}

    def total(ranks):
        return sum(adapter_size(layers[p], r) for p, r in ranks.items())

    low, high = 0.0, 4.0 * rank
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if total(ranks_at(mid)) < target else (low, mid)
    return min((ranks_at(low), ranks_at(high)), key=lambda r: abs(total(r) - target))


@dataclasses.dataclass
class Setup:
    """A model, its base weights, one method and the sizes it was built for."""

    name: str
    model: Any
    params: dict
    method: train_lib.Method
    lora_config: lora.LoraConfig | None
    adapter_params: int


def _registered(config, model, params, sample, rng) -> tuple[train_lib.Method, int]:
    """The method of `config` built as `train.py` builds it, its init run once, eagerly."""
    adaptation = methods.build(config, model, image_shape=sample.shape)
    trainable, frozen = jax.jit(adaptation.method.init_fn)(rng, params)
    size = 0
    if config.method != "full":
        # LoRA's B and AdaptIR's tail are zero at init (identity); non-zero values keep every
        # branch's output and gradient honest.
        adapters = {k: v for k, v in trainable.items() if k != "params"}
        adapters = jax.tree.map(lambda v: v + 0.01, adapters)
        trainable = {**trainable, **adapters}
        size = sum(x.size for x in jax.tree.leaves(adapters))
    return train_lib.Method(lambda _: (trainable, frozen), adaptation.method.apply_fn), size


def make_setup(
    variant: str,
    method: str,
    sample,
    *,
    rank: int = 4,
    seed: int = 0,
    overrides=None,
    bias_norm: bool = True,
) -> Setup:
    """Builds `method` on `variant` for inputs shaped like `sample` (ShapeDtypeStruct or array).

    `overrides` replace constructor fields of the variant (`models.build`), e.g. fewer blocks.
    `bias_norm=False` trains the LoRA factors only (lora, colora), not the biases and norms.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {METHODS}")
    model = build(variant, **(overrides or {}))
    params = random_params(intercept.eval_shape_init(model, sample)["params"], seed)
    rng = jax.random.key(seed)
    config = configs_common.training_config("finetune", "lora" if method == "colora" else method)
    lora_config = None
    if method in ("lora", "colora"):
        layers = conv_layers(model, sample)
        ranks = {p: rank for p in layers} if method == "lora" else colora_ranks(layers, rank)
        config.lora.targets = lora.targets_from_ranks(ranks)
        config.lora.tune_bias_norm = bias_norm
        lora_config = lora_method.lora_config(config.lora)
    m, size = _registered(config, model, params, sample, rng)
    return Setup(method, model, params, m, lora_config, size)


def make_step(setup: Setup, *, num_train_steps: int = 1000, degrade_fn=None):
    """`(jitted step, state, frozen)` for `setup` (AdamW, PSNR loss, donated state)."""
    trainable, frozen = setup.method.init_fn(None)
    tx = train_lib.make_optimizer(
        ml_collections.ConfigDict(OPTIMIZER), num_train_steps=num_train_steps
    )
    state = train_lib.initial_state(trainable, tx, 0)
    step = jax.jit(
        lambda state, frozen, batch: train_lib.train_step(
            state,
            frozen,
            batch,
            apply_fn=setup.method.apply_fn,
            objective=train_lib.restoration_objective(losses.psnr_loss),
            tx=tx,
            degrade_fn=degrade_fn,
        ),
        donate_argnums=(0,),
    )
    return step, state, frozen


@contextlib.contextmanager
def low_rank_backward_ratio(ratio: float):
    """`lora.LOW_RANK_BACKWARD_RATIO` set to `ratio` inside (it is read when a step is traced):
    0 gives every eligible layer the low-rank backward, inf none."""
    previous, lora.LOW_RANK_BACKWARD_RATIO = lora.LOW_RANK_BACKWARD_RATIO, ratio
    try:
        yield
    finally:
        lora.LOW_RANK_BACKWARD_RATIO = previous


def tree_bytes(tree) -> int:
    """Bytes held by the array leaves of `tree`."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def compile_seconds(jitted: Callable, *args) -> tuple[Any, float]:
    """`(compiled, seconds)`: lowering plus XLA compilation of `jitted` for `args`."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], *, steps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` (blocked until ready) over `steps` calls after `warmup`."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample_batch(batch: int, size: int, seed: int = 0) -> dict[str, jax.Array]:
    """`{"lq", "gt"}` of `(batch, size, size, 3)` in [0, 1]: gt plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    gt = rng.random((batch, size, size, 3), dtype=np.float32)
    lq = np.clip(gt + rng.normal(0, 0.1, gt.shape).astype(np.float32), 0, 1)
    return {"lq": jnp.asarray(lq), "gt": jnp.asarray(gt)}


def check_nafnet_variant(variant: str) -> None:
    """Raises if `variant` is not a NAFNet (the PyTorch comparison builds only NAFNet)."""
    if not isinstance(build(variant), nafnet.NAFNet):
        raise ValueError(f"{variant!r} is not a NAFNet variant")
