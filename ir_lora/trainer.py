"""The training loop: mesh, born-sharded state, resume, jitted steps, logging, checkpoints.

`train(config, workdir, method=..., data_iterator=...)` is model- and method-agnostic: the method
supplies `init_fn`/`apply_fn` (and optionally `degrade_fn`), the data iterator yields this
process's part of each batch as numpy arrays. Resume order:

  1. the newest readable checkpoint in `<workdir>/checkpoints` (train state + iterator position);
  2. otherwise a fresh state from `method.init_fn` (with `frozen=` replacing its frozen tree).
"""

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
import tqdm
from clu import parameter_overview

from ir_lora import checkpointing, losses, train_lib
from ir_lora import sharding as sharding_lib
from ir_lora.clu_compat import metric_writers, periodic_actions
from ir_lora.data import prefetch

# Jitted once per process: merging and reducing metrics eagerly would compile one tiny program
# per jnp operation.
_merge_metrics = jax.jit(lambda a, b: a.merge(b))
_compute_metrics = jax.jit(lambda metrics: metrics.compute())


def default_config() -> ml_collections.ConfigDict:
    """The loop's configuration keys with their defaults (method and data keys live elsewhere)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 1000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    # Only used with train(eval_fn=...).
    config.eval_every_steps = 500
    config.max_to_keep = 3
    config.loss = "psnr_loss"
    config.loss_kwargs = {}
    # Size of the "fsdp" mesh axis; parameters above min_size_to_shard elements are split on it.
    config.fsdp = 1
    config.min_size_to_shard = 2**18
    config.optimizer = ml_collections.ConfigDict(
        {
            "lr": 1e-3,
            "b1": 0.9,
            "b2": 0.9,
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "end_lr": 1e-7,
            "grad_clip_norm": 0.0,
        }
    )
    return config


def _config_as_json(config: Any) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def _nonfinite_error(step: int, last_ok: int, manager) -> FloatingPointError:
    latest = manager.latest_step()
    where = (
        f"the last good checkpoint is step {latest} in {manager.directory}"
        if latest is not None
        else "no checkpoint has been written"
    )
    return FloatingPointError(
        f"Non-finite loss or gradients between steps {last_ok + 1} and {step}; training "
        f"stopped and nothing after step {last_ok} was saved: {where}."
    )


def train(
    config: Any,
    workdir: str | os.PathLike,
    *,
    method: train_lib.Method,
    data_iterator: Any,
    tx: optax.GradientTransformation | None = None,
    learning_rate_fn: optax.Schedule | None = None,
    frozen: Any = None,
    init_args: tuple = (),
    backbone_path: str | os.PathLike | None = None,
    references: Mapping[str, str | os.PathLike] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    eval_fn: Callable[[train_lib.TrainState, Any], Mapping[str, Any]] | None = None,
    metrics_log: list[dict[str, float]] | None = None,
) -> tuple[train_lib.TrainState, Any]:
    """Trains `method` for `config.num_train_steps` updates, resuming from `workdir` if possible.

    Args:
      config: see `default_config()` for the keys read here.
      workdir: checkpoints go to `<workdir>/checkpoints`, TensorBoard events to `<workdir>`.
      method: a `train_lib.Method` (or any object with `init_fn`, `apply_fn`, and optionally
        `degrade_fn` and `objective`; without an objective the prediction is scored against
        `gt` with `config.loss`).
      data_iterator: yields dicts of numpy arrays (`{"lq", "gt"}`, `{"gt"}` with a
        `degrade_fn`, or what the method's objective reads), this process's share of the
        global batch; `get_state`/`set_state` (e.g. a grain iterator) make resumption exact.
      tx: the optimizer; default `train_lib.make_optimizer(config.optimizer, ...)`.
      learning_rate_fn: the schedule inside a given `tx`, only to log the learning rate (with the
        default `tx` it is `make_schedule(config.optimizer, ...)`).
      frozen: a loaded frozen tree to use instead of `init_fn`'s (see `create_train_state`).
      init_args: arrays passed to `method.init_fn` after the key (e.g. the loaded backbone).
      backbone_path: file or directory the frozen tree was loaded from; its hash is recorded in
        every checkpoint and checked on resume.
      references: `{name: path}` of other frozen inputs (e.g. a router), recorded and checked
        likewise.
      mesh: default `sharding.make_mesh(config)`.
      eval_fn: `(state, frozen) -> {name: value}` run every `config.eval_every_steps` steps
        (default: only after the last step) and written with `metric_writers.write_values`:
        plain numbers become scalars, `clu.values.Image(...)` images, etc.
      metrics_log: if given, every logged set of training scalars is appended to it as
        `{"step": step, "train_loss": ..., ...}` (this call's steps; earlier ones are in the
        TensorBoard files).

    Returns:
      `(state, frozen)` after the last step.

    Raises:
      FloatingPointError: when the loss or gradients become NaN/Inf; checkpoints written before
        stay the newest, and no later state is saved.
    """
    workdir = os.fspath(workdir)
    num_steps = int(config.num_train_steps)
    log_every = int(config.get("log_every_steps", 50))
    checkpoint_every = int(config.get("checkpoint_every_steps", num_steps))
    eval_every = int(config.get("eval_every_steps", num_steps))
    for key, value in [
        ("num_train_steps", num_steps),
        ("log_every_steps", log_every),
        ("checkpoint_every_steps", checkpoint_every),
        ("eval_every_steps", eval_every),
    ]:
        if value < 1:
            raise ValueError(f"config.{key} must be a positive integer, got {value}")
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(config)
    if tx is None:
        tx = train_lib.make_optimizer(config.optimizer, num_train_steps=num_steps)
        learning_rate_fn = train_lib.make_schedule(config.optimizer, num_train_steps=num_steps)

    state, frozen, state_shardings, frozen_shardings = train_lib.create_train_state(
        init_fn=method.init_fn,
        tx=tx,
        rng=int(config.get("seed", 0)),
        mesh=mesh,
        frozen=frozen,
        init_args=init_args,
        min_size_to_shard=int(config.get("min_size_to_shard", 2**18)),
    )
    stats = jax.process_count() == 1
    parameter_overview.log_parameter_overview(
        state.trainable, msg="Trainable parameters", include_stats=stats
    )
    if jax.tree.leaves(frozen):
        parameter_overview.log_parameter_overview(
            frozen, msg="Frozen parameters", include_stats=stats
        )
    config_json = _config_as_json(config)

    backbone = checkpointing.backbone_reference(backbone_path) if backbone_path else None
    references = dict(references or {})
    recorded = {name: checkpointing.backbone_reference(p) for name, p in references.items()}
    manager = checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.get("max_to_keep", 3)
    )
    restored = checkpointing.restore(
        manager,
        state,
        data_iterator=data_iterator,
        backbone_path=backbone_path,
        reference_paths=references,
        config=config_json,
        quarantine=True,
    )
    if restored is not None:
        state = restored[0]
        logging.info("Resuming from step %d.", int(state.step))
    # Created only now: a checkpoint that does not fit the config stops the run before it writes.
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams(config_json)

    objective = getattr(method, "objective", None)
    if objective is None:
        loss_fn = losses.get(config.get("loss", "psnr_loss"), **dict(config.get("loss_kwargs", {})))
        objective = train_lib.restoration_objective(loss_fn)
    step_fn = train_lib.make_train_step(
        apply_fn=method.apply_fn,
        objective=objective,
        tx=tx,
        mesh=mesh,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
        degrade_fn=getattr(method, "degrade_fn", None),
        learning_rate_fn=learning_rate_fn,
    )
    batch_sharding = sharding_lib.data_sharding(mesh)
    # The next batches are read and put on the devices while the current step runs; the feed's
    # state is that of the batches the loop has taken, which is what checkpoints record.
    feed = prefetch.Prefetcher(
        data_iterator,
        transform=lambda b: sharding_lib.make_global_batch(b, batch_sharding),
        max_items=num_steps - int(state.step),
    )
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_steps=log_every
    )
    first_step = int(state.step)
    last_checked = first_step
    # Metrics merged on device since the last log; `pending.nonfinite` counts NaN/Inf steps. It is
    # read (a host sync) only at log and save steps, which covers every step since the last check.
    pending = None
    # A terminal progress bar on the first host (logs and ReportProgress carry steps/s and ETA).
    progress_bar = tqdm.tqdm(
        total=num_steps,
        initial=first_step,
        unit="step",
        disable=jax.process_index() > 0 or not sys.stderr.isatty(),
    )
    with progress_bar, metric_writers.ensure_flushes(writer), feed:
        for step in range(first_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(feed)
                state, metrics = step_fn(state, frozen, batch)
            pending = metrics if pending is None else _merge_metrics(pending, metrics)
            report_progress(step)
            progress_bar.update(1)

            is_last = step == num_steps
            if eval_fn is not None and (step % eval_every == 0 or is_last):
                with report_progress.timed("eval"):
                    metric_writers.write_values(writer, step, dict(eval_fn(state, frozen)))
            should_log = step % log_every == 0 or is_last
            should_save = step % checkpoint_every == 0 or is_last
            if not (should_log or should_save):
                continue
            if float(pending.nonfinite.total) > 0:
                manager.wait_until_finished()
                raise _nonfinite_error(step, last_checked, manager)
            last_checked = step
            if should_log:
                values = {k: float(v) for k, v in _compute_metrics(pending).items()}
                values = {f"train_{k}": v for k, v in values.items()}
                del values["train_nonfinite"]
                if learning_rate_fn is None:
                    del values["train_learning_rate"]
                # Share of wall time since the last log spent blocked on the input pipeline.
                values["data_wait_fraction"] = feed.take_wait_fraction()
                progress_bar.set_postfix(data_wait=f"{values['data_wait_fraction']:.0%}")
                writer.write_scalars(step, values)
                if metrics_log is not None:
                    metrics_log.append({"step": step, **values})
                pending = None
            if should_save:
                checkpointing.save(
                    manager,
                    state,
                    step=step,
                    data_iterator=feed,
                    backbone=backbone,
                    references=recorded,
                    extra_metadata={"config": config_json},
                )
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return state, frozen
