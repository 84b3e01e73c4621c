"""What `train.py` and `eval.py` run: a config's stage, from data to checkpoints to result tables.

Stages (`config.stage`):

* `pretrain`: a backbone from scratch, every parameter trained, on clean images that the PROD
  sampler degrades inside the jitted step (`config.prod`).
* `finetune`: a pre-trained backbone (`config.init.checkpoint`: an exported params directory or a
  pre-training workdir; or `config.init.torch`: an official PyTorch `.pth`) adapted with
  `config.method` on paired data (or clean data with `data.noise_sigma`). The checkpoints hold only
  what trains, plus the path and hash of the backbone and of the method's other frozen inputs.
* `contributions`: CoLoRA's per-layer contributions of a pre-trained backbone to a task, the
  ranks under the budget, and their charts (`ir_lora.colora.pipeline`), written to the workdir;
  `ranks.json` is what `method="colora"` reads.

Every run ends by exporting the plain inference params (adapters merged) to
`<workdir>/export/params` (methods that cannot merge: all variable collections to
`<workdir>/export/variables`) and evaluating `config.eval.datasets` into `<workdir>/eval/`.

Methods take part through the hooks of their `methods.MethodSpec`, never by name here: `prepare`
completes the config (CoLoRA computes its ranks, LoRA-IR finds its recorded router), `load` and
`references` supply the frozen inputs, and `train_and_evaluate` / `evaluate` replace the stage
of a method that composes trained runs (UIR-LoRA). Backbones are built, loaded and exported by
`ir_lora.backbones` (`build_model`, `load_params`, `load_backbone`, `export_params`, also
reachable here).
"""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import values

from ir_lora import checkpointing, evaluator, methods, models, train_lib, trainer
from ir_lora import sharding as sharding_lib
from ir_lora.backbones import EXPORT_DIR, build_model, export_params, load_backbone, load_params
from ir_lora.data import pipeline
from ir_lora.data import prepare as prepare_dataset
from ir_lora.peft import partition

STAGES = ("pretrain", "finetune", "contributions")
# Methods whose adapters cannot be merged (AdaptIR, mixtures of experts) export every collection.
EXPORT_VARIABLES_DIR = os.path.join("export", "variables")


# ---------------------------------------------------------------------------------------------
# Data.


def _data_dir(config, workdir: str) -> str:
    return config.data.get("data_dir") or os.path.join(workdir, "tfds")


def _noise_sigma(section) -> float | None:
    sigma = section.get("noise_sigma", 0.0)
    return float(sigma) if sigma else None


def train_iterator(config, workdir: str):
    """This process's grain iterator over the training data (checkpointable state)."""
    source = prepare_dataset(
        config.data.dataset,
        source_dir=config.data.source_dir,
        data_dir=_data_dir(config, workdir),
        split=config.data.split,
    )
    dataset = pipeline.train_dataset(
        source,
        gt_size=config.data.gt_size,
        global_batch_size=config.data.batch_size,
        seed=config.seed,
        use_hflip=config.data.use_hflip,
        use_rot=config.data.use_rot,
        noise_sigma=_noise_sigma(config.data),
    )
    return iter(dataset)


def eval_datasets(config, workdir: str, names=None) -> dict[str, Any]:
    """`config.eval.datasets` (optionally only `names`) as evaluator inputs."""
    specs = dict(config.eval.datasets)
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"Unknown eval datasets {unknown}; configured: {sorted(specs)}")
        specs = {name: specs[name] for name in names}
    out = {}
    for name, spec in specs.items():
        source = prepare_dataset(
            spec.dataset,
            source_dir=spec.source_dir,
            data_dir=_data_dir(config, workdir),
            split=spec.get("split", "val"),
        )
        sigma = _noise_sigma(spec)
        out[name] = pipeline.eval_dataset(source, noise_sigma=sigma) if sigma else source
    return out


def run_evaluation(config, restore_fn, params, datasets, out_dir: str) -> dict:
    """`evaluator.evaluate` with the config's settings; logs and returns the results."""
    section = config.eval
    results = evaluator.evaluate(
        restore_fn,
        datasets,
        params=params,
        crop_border=section.crop_border,
        test_y_channel=section.test_y_channel,
        tile=section.tile or None,
        tile_overlap=section.tile_overlap,
        pad_multiple=section.pad_multiple,
        out_dir=out_dir,
        save_images=section.save_images,
        save_comparisons=section.save_comparisons,
    )
    logging.info("Evaluation (%s):\n%s", out_dir, evaluator.format_table(results))
    return results


# ---------------------------------------------------------------------------------------------
# Stages.


def _check_config(config) -> None:
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
    if config.stage == "pretrain" and not methods.trains_backbone(config):
        able = " or ".join(repr(n) for n, s in methods.REGISTRY.items() if s.trains_backbone)
        raise ValueError(
            f"stage='pretrain' trains every backbone parameter: method must be {able}, set to "
            f"train all of them (methods.trains_backbone), got {config.method!r}"
        )


def _prepare(config, workdir: str, *, training: bool):
    """The config as the method completes it (`MethodSpec.prepare`) for this workdir."""
    prepare = methods.spec(config).prepare
    return config if prepare is None else prepare(config, workdir, training=training)


def build_adaptation(config, model) -> methods.Adaptation:
    """The config's method on `model`, with PROD inside the step when pre-training.

    `config.data.degrade = "prod"` also synthesises the inputs of a fine-tune with PROD (clean
    `images` data; e.g. one degradation per image with `prod.mode = "single"`).
    """
    degrade_fn = None
    if config.stage == "pretrain" or config.data.get("degrade", "") == "prod":
        from ir_lora import degradations  # The sampler is only needed when pre-training.

        prod_config = config.prod

        def degrade_fn(rng, clean):
            return degradations.prod(rng, clean, prod_config)

    shape = (1, config.data.gt_size, config.data.gt_size, 3)
    return methods.build(config, model, image_shape=shape, degrade_fn=degrade_fn)


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
    """Runs `config.stage` in `workdir` (resuming if it holds checkpoints).

    Returns:
      `{"report": ParameterReport, "export": path, "eval": results or None}`; for the
      `contributions` stage, `ir_lora.colora.pipeline.compute`'s result.
    """
    _check_config(config)
    own_stage = methods.spec(config).train_and_evaluate
    if own_stage is not None:
        return own_stage(config, workdir)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.stage == "contributions":
        from ir_lora.colora import pipeline  # CoLoRA only: plotting and FAIG.

        return pipeline.compute(config, workdir)
    config = _prepare(config, workdir, training=True)
    model = build_model(config)
    adaptation = build_adaptation(config, model)
    init_args, backbone_path, references = _frozen_inputs(config)
    shapes = models.param_shapes(config.model.variant, **dict(config.model.get("overrides", {})))
    report = adaptation.report(shapes)
    logging.info("Parameters (%s, method=%s):\n%s", config.model.variant, config.method, report)

    data_iterator = train_iterator(config, workdir)
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
    restore_fn, params = inference(adaptation, model, variables)
    export = None
    if config.export:
        where = EXPORT_DIR if adaptation.merge_fn is not None else EXPORT_VARIABLES_DIR
        export = export_params(params, os.path.join(workdir, where))

    results = None
    if config.eval.datasets:
        results = run_evaluation(
            config,
            restore_fn,
            params,
            eval_datasets(config, workdir),
            os.path.join(workdir, "eval"),
        )
    return {"report": report, "export": export, "eval": results}


def _frozen_inputs(config) -> tuple[tuple, str | None, dict[str, str]]:
    """`(init_args, backbone path, references)`: what `init_fn` gets after the key, and the
    frozen inputs whose path and hash checkpoints record (`MethodSpec.references`: e.g. a router).

    A method with its own loader (`MethodSpec.load`, e.g. `moe`: backbone, modulation and
    router) uses it; otherwise a fine-tune loads the backbone of `config.init`, pre-training
    nothing.
    """
    spec = methods.spec(config)
    references = {} if spec.references is None else spec.references(config)
    if spec.load is not None:
        tree, path = spec.load(config, load_params)
        return (tree,), path, references
    if config.stage == "finetune":
        backbone, path = load_backbone(config)
        return (backbone,), path, references
    return (), None, references


def inference(adaptation: methods.Adaptation, model, variables) -> tuple[Any, Any]:
    """`(restore_fn(params, images), params)` for evaluation and export.

    Mergeable methods give the plain backbone params (adapters folded in); the others (AdaptIR,
    mixtures of experts) keep every variable collection and run the method's forward pass.
    """
    if adaptation.merge_fn is not None:
        return (lambda p, x: model.apply({"params": p}, x)), adaptation.merge_fn(variables)
    return (lambda v, x: adaptation.method.apply_fn(v, {}, x)), variables


def restore_trained(config, workdir: str) -> tuple[dict, methods.Adaptation, int]:
    """The newest checkpoint of a training workdir as variables (every collection, unmerged).

    The backbone comes from `config.init` (the method's other frozen inputs from the config,
    or where the checkpoint recorded them, `MethodSpec.prepare`) and is checked against the hash
    the checkpoint recorded. Returns `(variables, adaptation, step)`; `inference` turns them into
    a restore function and its params (adapters merged where the method allows).
    """
    # First: a missing workdir is an error that names it, before anything is built or written.
    manager = checkpointing.make_manager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), create=False
    )
    config = _prepare(config, workdir, training=False)
    model = build_model(config)
    adaptation = build_adaptation(config, model)
    init_args, backbone_path, references = _frozen_inputs(config)
    steps = int(config.num_train_steps)
    tx = train_lib.make_optimizer(config.optimizer, num_train_steps=steps)
    state, frozen, _, _ = train_lib.create_train_state(
        init_fn=adaptation.method.init_fn,
        tx=tx,
        rng=int(config.seed),
        mesh=sharding_lib.make_mesh(config),
        init_args=init_args,
    )
    restored = checkpointing.restore(
        manager, state, backbone_path=backbone_path, reference_paths=references, config=config
    )
    if restored is None:
        raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints")
    state = restored[0]
    variables = jax.device_get(partition.combine(state.trainable, frozen))
    return variables, adaptation, int(state.step)


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
    own_evaluation = methods.spec(config).evaluate
    if own_evaluation is not None:
        if not workdir:
            raise ValueError(
                f"method={config.method!r} is evaluated from its workdir, not a checkpoint"
            )
        return own_evaluation(config, workdir, datasets=datasets, out_dir=out_dir)
    model = build_model(config)
    if checkpoint:
        params, where = load_params(config, checkpoint)
        base = where if os.path.isdir(where) else os.path.dirname(where)
        restore_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    else:
        variables, adaptation, step = restore_trained(config, workdir)
        restore_fn, params = inference(adaptation, model, variables)
        base = os.path.abspath(workdir)
        logging.info("Evaluating step %d of %s", step, workdir)
    data_root = workdir or os.path.dirname(base)
    return run_evaluation(
        config,
        restore_fn,
        params,
        eval_datasets(config, data_root, datasets),
        out_dir or os.path.join(base, "eval"),
    )
