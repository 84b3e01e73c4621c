"""The `pretrain` and `finetune` stages: a config's method trained, exported and evaluated.

* `pretrain`: a backbone from scratch, every parameter trained (the method must train the whole
  backbone, `MethodSpec.trains_backbone`), usually on clean images that the PROD sampler
  degrades inside the jitted step (`data.degrade = "prod"`, `config.prod`).
* `finetune`: a pre-trained backbone (`config.init.checkpoint`: an exported params directory or
  a pre-training workdir; or `config.init.torch`: an official PyTorch `.pth`) adapted with
  `config.method` on paired data (or clean data with `data.noise_sigma` or PROD). The
  checkpoints hold only what trains, plus the path and hash of the backbone and of the method's
  other frozen inputs.

Every run ends by exporting the plain inference params (adapters merged) to
`<workdir>/export/params` (methods that cannot merge: all variable collections to
`<workdir>/export/variables`) and evaluating `config.eval.datasets` into `<workdir>/eval/`.
Methods take part through their `MethodSpec` only (`ir_lora.services`), never by name here.
"""

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import values

from ir_lora import methods, models, services, trainer
from ir_lora.peft import partition


def check_finetune_init(config) -> None:
    """A fine-tune starts from exactly one pre-trained backbone (`config.init`)."""
    services.backbone_source(config)


def check_config(config) -> None:
    """What the stage needs of the config, before anything is built or written."""
    if config.stage == "pretrain" and not methods.trains_backbone(config):
        able = " or ".join(repr(n) for n, s in methods.REGISTRY.items() if s.trains_backbone)
        raise ValueError(
            f"stage='pretrain' trains every backbone parameter: method must be {able}, set to "
            f"train all of them (methods.trains_backbone), got {config.method!r}"
        )
    if config.stage == "finetune":
        check_finetune_init(config)


def sample_images_fn(adaptation: methods.Adaptation, batch: dict, *, seed: int, count: int = 4):
    """An `eval_fn` for the trainer: degraded | restored | target rows of fixed training crops.

    The crops are taken once, before training (for pre-training they are degraded once with a
    fixed key), so the TensorBoard images show the same inputs at every step.
    """
    gt = np.asarray(batch["gt"][:count])
    if "lq" in batch:
        lq = np.asarray(batch["lq"][:count])
    else:
        lq = np.asarray(adaptation.method.degrade_fn(jax.random.key(seed), jnp.asarray(gt))[0])
    restore = jax.jit(adaptation.method.apply_fn)

    def eval_fn(state, frozen):
        restored = np.clip(np.asarray(restore(state.trainable, frozen, lq)), 0.0, 1.0)
        rows = np.concatenate([lq, restored, gt], axis=2)  # side by side, one row per crop
        grid = rows.reshape(-1, *rows.shape[2:])[None]  # the rows stacked into one image
        return {"samples/degraded_restored_target": values.Image(grid)}

    return eval_fn


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the `pretrain` or `finetune` stage in `workdir` (resuming if it holds checkpoints).

    Returns:
      `{"report": ParameterReport, "export": path or None, "eval": results or None}`.
    """
    check_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # Every split the run evaluates is prepared (or found missing) before any training.
    eval_inputs = services.eval_datasets(config, workdir) if config.eval.datasets else None
    config = services.with_recorded_references(config, workdir)
    model = services.build_model(config)
    adaptation = services.build_adaptation(config, model)
    init_args, backbone_path, references = services.frozen_inputs(config)
    shapes = models.param_shapes(config.model.variant, **dict(config.model.get("overrides", {})))
    report = adaptation.report(shapes)
    logging.info("Parameters (%s, method=%s):\n%s", config.model.variant, config.method, report)

    data_iterator = services.train_iterator(config, workdir)
    # The fixed image-summary crops are the first batch; rewinding keeps the training
    # iterator's (checkpointed) position where it was.
    start = data_iterator.get_state()
    samples = next(data_iterator)
    data_iterator.set_state(start)
    state, frozen = trainer.train(
        config,
        workdir,
        method=adaptation.method,
        data_iterator=data_iterator,
        init_args=init_args,
        backbone_path=backbone_path,
        references=references,
        eval_fn=sample_images_fn(adaptation, samples, seed=config.seed),
    )
    # Written after training: a rerun whose config does not fit the checkpoints stops before.
    _write_text(os.path.join(workdir, "parameters.md"), report.to_markdown() + "\n")
    variables = jax.device_get(partition.combine(state.trainable, frozen))
    restore_fn, params = services.inference(adaptation, model, variables)
    export = None
    if config.export:
        mergeable = adaptation.merge_fn is not None
        where = services.EXPORT_DIR if mergeable else services.EXPORT_VARIABLES_DIR
        export = services.export_params(params, os.path.join(workdir, where))

    results = None
    if eval_inputs:
        results = services.run_evaluation(
            config, restore_fn, params, eval_inputs, os.path.join(workdir, "eval")
        )
    return {"report": report, "export": export, "eval": results}


def evaluate(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    datasets: list[str] | None = None,
    out_dir: str | None = None,
) -> dict:
    """Evaluates a training workdir's newest checkpoint, or params at `checkpoint`.

    Args:
      config: the config the model was trained with (model, method, init, eval sections).
      workdir: a training workdir (its newest checkpoint, with its backbone).
      checkpoint: instead of `workdir`: exported params (`<workdir>/export/params`) or an
        official PyTorch `.pth` file of `config.model`.
      datasets: names from `config.eval.datasets` (default: all).
      out_dir: where tables and images go (default `<workdir or checkpoint dir>/eval`).
    """
    if bool(workdir) == bool(checkpoint):
        raise ValueError("Give exactly one of workdir and checkpoint")
    model = services.build_model(config)
    if checkpoint:
        params, where = services.load_params(config, checkpoint)
        base = where if os.path.isdir(where) else os.path.dirname(where)
        restore_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    else:
        variables, adaptation, step = services.restore_trained(config, workdir)
        restore_fn, params = services.inference(adaptation, model, variables)
        base = os.path.abspath(workdir)
        logging.info("Evaluating step %d of %s", step, workdir)
    data_root = workdir or os.path.dirname(base)
    return services.run_evaluation(
        config,
        restore_fn,
        params,
        services.eval_datasets(config, data_root, datasets),
        out_dir or os.path.join(base, "eval"),
    )
