"""CoLoRA's stages: contributions of each layer to a task, ranks, charts, files; the fine-tune.

`contributions(config, workdir)` is the `colora_contributions` stage of `train.py`, and what the
`colora` stage (`finetune`) runs first when `config.colora.ranks` is empty:

1. load the pre-trained backbone (`config.init`) and draw `colora.num_batches` training batches
   of the task (`config.data`, the same crops and augmentation as training);
2. contributions: FAIG (`colora.contribution="faig"`) along the path from the backbone to a
   brief full fine-tune of it (`colora.probe_steps` steps at `colora.probe_lr`, in
   `<out_dir>/probe`, whose full-size checkpoints are deleted once FAIG has run), or gradient
   norms at the backbone ("grad_norm", no fine-tune);
3. per-layer scores (`layer_scores`) and ranks under the budget (`allocate_ranks`);
4. files in `out_dir`: `contributions.json`, `ranks.json` (what `method=colora` reads),
   `ranks.txt` (the per-layer table, also logged), `contributions.png` (one bar per block,
   coloured encoder / middle / decoder) and `ranks.png` (one bar per layer).

The `colora` stage then fine-tunes `method = colora` with those ranks, exactly as the `finetune`
stage (`ir_lora.stages.training`); evaluating it reads the ranks the run computed.
"""

import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ir_lora import models, services, trainer
from ir_lora.methods import full
from ir_lora.methods.colora import contributions as contributions_lib
from ir_lora.methods.colora import files, plot, ranks
from ir_lora.peft import partition
from ir_lora.stages import training

CONTRIBUTIONS = ("faig", "grad_norm")
RANKS_FILE = "ranks.json"
SUBDIR = "colora"  # where a fine-tune run keeps the ranks it computed itself


def _check(section) -> None:
    if section.contribution not in CONTRIBUTIONS:
        raise ValueError(
            f"config.colora.contribution={section.contribution!r} is not one of {CONTRIBUTIONS}"
        )
    for key in ("num_batches", "faig_steps", "probe_steps"):
        if int(section[key]) < 1:
            raise ValueError(f"config.colora.{key} must be >= 1, got {section[key]}")


def training_batches(config, workdir: str, num_batches: int) -> dict[str, np.ndarray]:
    """`num_batches` training batches stacked to `(num_batches, batch_size, H, W, C)` leaves."""
    iterator = services.train_iterator(config, workdir)
    drawn = [next(iterator) for _ in range(num_batches)]
    return {key: np.stack([batch[key] for batch in drawn]) for key in ("lq", "gt")}


def probe_finetune(
    config, probe_dir: str, backbone: Any, backbone_path: str, *, workdir: str
) -> Any:
    """The backbone after `colora.probe_steps` steps of full fine-tuning on the task's data.

    Runs in `probe_dir` with the trainer (logs stay there); the full-size checkpoints are removed
    afterwards, since only the tuned params are needed, once, for FAIG. `workdir` is the run's
    (its prepared data are reused).
    """
    section = config.colora
    probe = config.copy_and_resolve_references()
    with probe.unlocked():
        probe.stage = "finetune"
        probe.method = "full"
        probe.full = full.default_config()
        probe.num_train_steps = int(section.probe_steps)
        probe.checkpoint_every_steps = int(section.probe_steps)
        probe.log_every_steps = max(1, min(int(config.log_every_steps), int(section.probe_steps)))
        probe.optimizer.lr = float(section.probe_lr)
        warmup = int(config.optimizer.warmup_steps)
        probe.optimizer.warmup_steps = min(warmup, int(section.probe_steps) // 10)
    model = services.build_model(probe)
    adaptation = services.build_adaptation(probe, model)
    state, frozen = trainer.train(
        probe,
        probe_dir,
        method=adaptation.method,
        data_iterator=services.train_iterator(probe, workdir),
        init_args=(backbone,),
        backbone_path=backbone_path,
    )
    tuned = jax.device_get(partition.combine(state.trainable, frozen))["params"]
    shutil.rmtree(os.path.join(probe_dir, "checkpoints"), ignore_errors=True)
    return tuned


def measure(config, workdir: str, model, backbone, backbone_path: str, out_dir: str):
    """Per-parameter contributions (`faig` or `grad_norm` output) for `config.colora`."""
    section = config.colora
    batches = training_batches(config, workdir, int(section.num_batches))
    loss_fn = contributions_lib.sum_squared_error(lambda p, x: model.apply({"params": p}, x))
    batches = jax.tree.map(jnp.asarray, batches)
    if section.contribution == "grad_norm":
        return contributions_lib.grad_norm(loss_fn, backbone, batches, rms=True)
    probe_dir = os.path.join(out_dir, "probe")
    tuned = probe_finetune(config, probe_dir, backbone, backbone_path, workdir=workdir)
    return contributions_lib.faig(
        loss_fn,
        backbone,
        tuned,
        batches,
        steps=int(section.faig_steps),
        per_image=bool(section.per_image),
    )


def contributions(
    config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None
) -> dict:
    """Contributions, ranks, charts and files for `config` (see the module docstring).

    Args:
      config: a fine-tuning config (`init`, `data`, `model`, `colora` sections).
      workdir: the run's workdir (prepared data default to `<workdir>/tfds`).
      out_dir: where the files go; default `workdir`.

    Returns:
      `{"scores": LayerScores, "allocation": RankAllocation, "files": {name: path}}`.
    """
    section = config.colora
    _check(section)
    workdir = os.path.abspath(workdir)
    out_dir = os.path.abspath(out_dir or workdir)
    os.makedirs(out_dir, exist_ok=True)
    model = services.build_model(config)
    backbone, backbone_path = services.load_backbone(config)
    overrides = dict(config.model.get("overrides", {}))
    shapes = models.param_shapes(config.model.variant, **overrides)

    ig = measure(config, workdir, model, backbone, backbone_path, out_dir)
    scores = contributions_lib.layer_scores(ig, reduce=section.reduce, filter=section.filter)
    allocation = ranks.allocate_ranks(
        scores.layers,
        shapes,
        budget_fraction=float(section.budget_fraction),
        rule=section.rule,
        normalize=section.normalize,
        beta=float(section.beta),
        delta_min=float(section.delta_min),
        r_min=int(section.r_min),
        tune_bias_norm=bool(section.tune_bias_norm),
        tolerance=float(section.tolerance),
    )
    model_info = {"variant": config.model.variant, "overrides": overrides}
    sample = jnp.zeros((1, config.data.gt_size, config.data.gt_size, 3), jnp.float32)
    order = plot.call_order(model, sample)
    table = format_scores(scores, order) + "\n\n" + allocation.table()
    out = {
        "contributions": files.save_scores(
            scores,
            os.path.join(out_dir, "contributions.json"),
            contribution=section.contribution,
            model=model_info,
            backbone=backbone_path,
        ),
        "ranks": files.save_allocation(
            allocation,
            os.path.join(out_dir, RANKS_FILE),
            tune_bias_norm=bool(section.tune_bias_norm),
            model=model_info,
        ),
        "contributions_png": plot.plot_block_contributions(
            scores,
            os.path.join(out_dir, "contributions.png"),
            order=order,
            title=f"{section.contribution} contribution per block",
        ),
        "ranks_png": plot.plot_ranks(
            allocation,
            os.path.join(out_dir, "ranks.png"),
            layer_stage=plot.layer_stages(scores),
            order=order,
        ),
    }
    out["table"] = os.path.join(out_dir, "ranks.txt")
    with open(out["table"], "w") as f:
        f.write(table + "\n")
    logging.info("CoLoRA contributions and ranks (%s):\n%s", out_dir, table)
    print(table)
    return {"scores": scores, "allocation": allocation, "files": out}


def format_scores(scores: contributions_lib.LayerScores, order=None) -> str:
    """Per-stage, per-group and per-block contributions as a text table, blocks in forward order."""
    lines = ["stage     contribution"]
    lines += [f"{name:<9} {value:.3e}" for name, value in scores.stages.items()]
    lines += ["", "group     contribution"]
    lines += [f"{name:<9} {value:.3e}" for name, value in scores.groups.items()]
    blocks = plot.forward_order(list(scores.blocks), scores.block_stage, order)
    width = max(len("block"), *(len(b) for b in blocks))
    lines += ["", f"{'block':<{width}}  stage     contribution"]
    lines += [
        f"{b:<{width}}  {scores.block_stage.get(b, 'other'):<9} {scores.blocks[b]:.3e}"
        for b in blocks
    ]
    return "\n".join(lines)


def with_ranks(config: ml_collections.ConfigDict, workdir: str, *, compute_missing: bool):
    """`config` with `colora.ranks` filled in for a run without a ranks file.

    Uses `<workdir>/colora/ranks.json` when an earlier (possibly interrupted) run of the same
    workdir wrote it; otherwise computes it there with `contributions` if `compute_missing`.
    A config with `colora.ranks` given comes back unchanged.
    """
    if config.colora.get("ranks", ""):
        return config
    path = os.path.join(os.path.abspath(workdir), SUBDIR, RANKS_FILE)
    if not os.path.isfile(path):
        if not compute_missing:
            raise FileNotFoundError(
                f"config.colora.ranks is empty and {path} does not exist: give the ranks file "
                "the run was trained with"
            )
        logging.info("config.colora.ranks is empty: computing contributions and ranks first")
        contributions(config, workdir, os.path.dirname(path))
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.colora.ranks = path
    return config


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `colora` stage: ranks first when `colora.ranks` is empty, then the fine-tune."""
    training.check_finetune_init(config)
    return training.train_and_evaluate(with_ranks(config, workdir, compute_missing=True), workdir)


def evaluate(config: ml_collections.ConfigDict, *, workdir=None, checkpoint=None, **kwargs):
    """`eval.py` for the `colora` stage: the run's own ranks, then `training.evaluate`."""
    if workdir:
        config = with_ranks(config, workdir, compute_missing=False)
    return training.evaluate(config, workdir=workdir, checkpoint=checkpoint, **kwargs)
