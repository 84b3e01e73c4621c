"""Train state, optimizer and the one jitted train step, independent of the model and method.

A *method* (full fine-tuning, LoRA, AdaptIR, a degradation router, ...) is two pure functions:

  init_fn(rng, *init_args) -> (trainable, frozen)
  apply_fn(trainable, frozen, inputs) -> prediction

`init_args` are arrays the caller already holds (e.g. a pre-trained backbone read from disk): they
enter the jitted init as arguments, never as constants baked into the program.

What the prediction is scored against is the method's *objective*, `(prediction, targets) ->
(loss, {metric: per-example or scalar values})`; `targets` is the batch without its input plus
the degradation labels. Restoration methods use `restoration_objective(loss_fn)` (the loss
against `gt`, PSNR as the metric); a router is trained with a classification objective on the
labels.

The loss differentiates only `trainable`; `frozen` is an ordinary jit argument that is never
differentiated and never donated, so the optimizer state and checkpoints hold only the trainable
tree. An optional `degrade_fn(rng, clean) -> (lq, labels)` (e.g. the PROD sampler) synthesises the
input inside the step from clean `gt` batches; its labels join the targets as `labels`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh

from ir_lora import sharding as sharding_lib

Batch = dict[str, jax.Array]
InitFn = Callable[[jax.Array], tuple[Any, Any]]
ApplyFn = Callable[[Any, Any, jax.Array], Any]
DegradeFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
Objective = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Method:
    """The functions that define what is trained (see the module docstring).

    `objective` None means restoration: the trainer scores the prediction against `gt` with the
    configured loss (`restoration_objective`).
    """

    init_fn: InitFn
    apply_fn: ApplyFn
    degrade_fn: DegradeFn | None = None
    objective: Objective | None = None


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, and nothing else (the frozen tree lives outside).

    Attributes:
      step: number of optimizer updates applied so far (int32 scalar).
      trainable: the differentiated parameter pytree.
      opt_state: optax state of `trainable` only.
      rng: raw uint32 PRNG key data; step `s` uses `fold_in(rng, s)`, so it never changes.
    """

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


# Measured by every step whatever the objective; `merge` keeps the last norms.
_STEP_METRICS = {
    "loss": clu_metrics.Average.from_output("loss"),
    "l2_grads": clu_metrics.LastValue.from_output("l2_grads"),
    "l2_updates": clu_metrics.LastValue.from_output("l2_updates"),
    "l2_params": clu_metrics.LastValue.from_output("l2_params"),
    "learning_rate": clu_metrics.LastValue.from_output("learning_rate"),
    # Fraction of merged steps whose loss or gradients were NaN/Inf: anything above 0 stops a run.
    "nonfinite": clu_metrics.Average.from_output("nonfinite"),
}


@functools.cache
def metrics_class(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
    """The per-step metrics `Collection`: the step's own plus the objective's `names`, which
    `merge` averages over steps."""
    clash = set(names) & set(_STEP_METRICS)
    if clash:
        raise ValueError(f"objective metrics {sorted(clash)} clash with the step's own metrics")
    own = {name: clu_metrics.Average.from_output(name) for name in names}
    return clu_metrics.Collection.create(**_STEP_METRICS, **own)


# The restoration methods' metrics: loss and PSNR averaged over steps, the last norms.
TrainMetrics = metrics_class(("psnr",))


def initial_state(trainable: Any, tx: optax.GradientTransformation, rng) -> TrainState:
    """The state at step 0 of `trainable` (unplaced; `create_train_state` makes one born sharded
    on a mesh); `rng` is an int seed or a PRNG key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=_to_key_data(rng),
    )


def make_schedule(config, *, num_train_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `config.lr`, then cosine decay to `config.end_lr` (default 0).

    `config.warmup_steps` (default 0) counts towards `num_train_steps`.
    """
    warmup = int(config.get("warmup_steps", 0))
    if not 0 <= warmup < num_train_steps:
        raise ValueError(
            f"optimizer warmup_steps={warmup} must be in [0, num_train_steps={num_train_steps})"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(config.lr),
        warmup_steps=warmup,
        decay_steps=num_train_steps,
        end_value=float(config.get("end_lr", 0.0)),
    )


def make_optimizer(
    config, *, num_train_steps: int, weight_decay_mask: Any = None
) -> optax.GradientTransformation:
    """AdamW on a warm-up + cosine schedule, after optional global-norm gradient clipping.

    Args:
      config: the optimizer section, a mapping with `lr` and optionally `b1` (0.9), `b2` (0.999),
        `eps` (1e-8), `weight_decay` (0, decoupled as in `torch.optim.AdamW`), `warmup_steps`
        (0), `end_lr` (0) and `grad_clip_norm` (None or 0: no clipping).
      num_train_steps: total number of updates (the cosine reaches `end_lr` there).
      weight_decay_mask: optional pytree (or callable) of bools, True where to decay.

    Returns:
      The optax transformation over the trainable pytree.
    """
    unknown = set(config) - {
        "lr", "b1", "b2", "eps", "weight_decay", "warmup_steps", "end_lr", "grad_clip_norm",
    }  # fmt: skip
    if unknown:
        raise ValueError(f"Unknown optimizer config keys: {sorted(unknown)}")
    adamw = optax.adamw(
        make_schedule(config, num_train_steps=num_train_steps),
        b1=float(config.get("b1", 0.9)),
        b2=float(config.get("b2", 0.999)),
        eps=float(config.get("eps", 1e-8)),
        weight_decay=float(config.get("weight_decay", 0.0)),
        mask=weight_decay_mask,
    )
    clip = config.get("grad_clip_norm")
    if clip:
        return optax.chain(optax.clip_by_global_norm(float(clip)), adamw)
    return adamw


def psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of `pred` clipped to [0, 1] (training monitor, not BasicSR-exact)."""
    err = jnp.mean(jnp.square(jnp.clip(pred, 0.0, 1.0) - target), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(err, 1e-10))


def restoration_objective(loss_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Objective:
    """`loss_fn(restored, gt)` (e.g. from `losses.get`), with PSNR against `gt` as the metric."""

    def objective(restored, targets):
        return loss_fn(restored, targets["gt"]), {"psnr": psnr(restored, targets["gt"])}

    return objective


def _to_key_data(rng) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng))
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def create_train_state(
    *,
    init_fn: InitFn,
    tx: optax.GradientTransformation,
    rng,
    mesh: Mesh,
    frozen: Any = None,
    init_args: tuple = (),
    min_size_to_shard: int = 2**18,
) -> tuple[TrainState, Any, TrainState, Any]:
    """Initialises the state and frozen tree directly in their shardings on `mesh`.

    Shapes come first (`jax.eval_shape`), then `sharding.param_shardings`, then a jitted init with
    `out_shardings`, so no array is ever materialised whole on one device.

    Args:
      init_fn: `(rng, *init_args) -> (trainable, frozen)`; traced under jit.
      tx: optimizer over the trainable tree.
      rng: an int seed or a PRNG key; split into the init key and the state key.
      mesh: from `sharding.make_mesh`.
      frozen: an already loaded frozen tree (e.g. a pre-trained backbone read from disk) to use
        instead of `init_fn`'s, so that it is not baked into the init program as a constant; its
        structure and shapes must equal `init_fn`'s.
      init_args: arrays passed to `init_fn` after the key, as jit arguments.
      min_size_to_shard: see `sharding.param_shardings`.

    Returns:
      `(state, frozen, state_shardings, frozen_shardings)`.
    """
    key_data = _to_key_data(rng)

    def init(key_data, init_args):
        init_key, state_key = jax.random.split(jax.random.wrap_key_data(key_data))
        trainable, frozen = init_fn(init_key, *init_args)
        return initial_state(trainable, tx, state_key), frozen

    init_args = tuple(init_args)
    abstract_state, abstract_frozen = jax.eval_shape(init, key_data, init_args)
    state_shardings = sharding_lib.param_shardings(
        abstract_state, mesh, min_size_to_shard=min_size_to_shard
    )
    frozen_shardings = sharding_lib.param_shardings(
        abstract_frozen, mesh, min_size_to_shard=min_size_to_shard
    )
    if frozen is None:
        state, frozen = jax.jit(init, out_shardings=(state_shardings, frozen_shardings))(
            key_data, init_args
        )
    else:
        given = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_frozen)
        if given != want:
            raise ValueError(
                "The given frozen tree does not match init_fn's frozen tree:\n"
                f"given: {given}\nexpected: {want}"
            )
        state = jax.jit(lambda k, a: init(k, a)[0], out_shardings=state_shardings)(
            key_data, init_args
        )
        frozen = jax.device_put(frozen, frozen_shardings)
    return state, frozen, state_shardings, frozen_shardings


def train_step(
    state: TrainState,
    frozen: Any,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    objective: Objective,
    tx: optax.GradientTransformation,
    degrade_fn: DegradeFn | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> tuple[TrainState, clu_metrics.Collection]:
    """One optimizer update on `batch` (pure; bind keywords with `functools.partial`, then jit).

    Args:
      state: the current state.
      frozen: the non-differentiated tree passed to `apply_fn`.
      batch: `{"lq", ...targets}` NHWC float32 in [0, 1]; without `lq` when `degrade_fn` makes
        it from `gt`.
      apply_fn: `(trainable, frozen, inputs) -> prediction`.
      objective: `(prediction, targets) -> (loss, metrics)`, e.g. `restoration_objective`;
        `targets` is `batch` without `lq`, plus `labels` from `degrade_fn`.
      tx: the optimizer `state.opt_state` belongs to.
      degrade_fn: `(rng, gt) -> (lq, labels)`; its rng is derived from `state.rng` and the step.
      learning_rate_fn: the schedule, only to report the learning rate of this step.

    Returns:
      The new state and this step's metrics (`metrics_class` of the objective's metric names).
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    targets = {k: v for k, v in batch.items() if k != "lq"}
    if degrade_fn is None:
        if "lq" not in batch:
            raise ValueError(f"batch has keys {sorted(batch)}; without degrade_fn it needs 'lq'")
        lq = batch["lq"]
    else:
        if "lq" in batch:
            raise ValueError("batch has 'lq' but degrade_fn synthesises it: pass only 'gt'")
        lq, labels = degrade_fn(jax.random.fold_in(step_rng, 0), batch["gt"])
        if labels is not None:
            targets["labels"] = labels

    def loss_of(trainable):
        return objective(apply_fn(trainable, frozen, lq), targets)

    (loss, measured), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    l2_grads = optax.tree.norm(grads)
    lr = jnp.nan if learning_rate_fn is None else learning_rate_fn(state.step)
    metrics = metrics_class(tuple(sorted(measured))).single_from_model_output(
        loss=loss,
        l2_grads=l2_grads,
        l2_updates=optax.tree.norm(updates),
        l2_params=optax.tree.norm(trainable),
        learning_rate=jnp.asarray(lr, jnp.float32),
        nonfinite=jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(l2_grads)).astype(jnp.float32),
        **measured,
    )
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def make_train_step(
    *,
    apply_fn: ApplyFn,
    objective: Objective,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    frozen_shardings: Any,
    degrade_fn: DegradeFn | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, clu_metrics.Collection]]:
    """`train_step` jitted with explicit shardings; the state argument is donated, `frozen` not."""
    step_fn = functools.partial(
        train_step,
        apply_fn=apply_fn,
        objective=objective,
        tx=tx,
        degrade_fn=degrade_fn,
        learning_rate_fn=learning_rate_fn,
    )
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, frozen_shardings, sharding_lib.data_sharding(mesh)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
