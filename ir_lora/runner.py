"""What `train.py` and `eval.py` run: a config's stage, from data to checkpoints to result tables.

Stages (`config.stage`):

* `pretrain`: a backbone from scratch, every parameter trained, on clean images that the PROD
  sampler degrades inside the jitted step (`config.prod`).
* `finetune`: a pre-trained backbone (`config.init.checkpoint`: an exported params directory or a
  pre-training workdir; or `config.init.torch`: an official PyTorch `.pth`) adapted with
  `config.method` on paired data (or clean data with `data.noise_sigma`). The checkpoints hold only
  what trains, plus the path and hash of the backbone. With `method="colora"` and no
  `colora.ranks` file, the run first computes contributions and ranks into `<workdir>/colora/`.
* `contributions`: CoLoRA's per-layer contributions of a pre-trained backbone to a task, the
  ranks under the budget, and their charts (`ir_lora.colora.pipeline`), written to the workdir;
  `ranks.json` is what `method="colora"` reads.

Every run ends by exporting the plain inference params (adapters merged) to
`<workdir>/export/params` (methods that cannot merge: all variable collections to
`<workdir>/export/variables`) and evaluating `config.eval.datasets` into `<workdir>/eval/`.
"""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import values

from ir_lora import checkpointing, evaluator, methods, models, train_lib, trainer
from ir_lora import sharding as sharding_lib
from ir_lora.data import pipeline
from ir_lora.data import prepare as prepare_dataset
from ir_lora.peft import partition

STAGES = ("pretrain", "finetune", "contributions")
EXPORT_DIR = os.path.join("export", "params")
# Methods whose adapters cannot be merged (AdaptIR, mixtures of experts) export every collection.
EXPORT_VARIABLES_DIR = os.path.join("export", "variables")


# ---------------------------------------------------------------------------------------------
# Backbones: build, load, export.


def build_model(config):
    return models.build(config.model.variant, **dict(config.model.get("overrides", {})))


def export_params(params: Any, directory: str) -> str:
    """Writes plain params with orbax (overwriting) and returns the absolute directory."""
    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()
    return directory


def _exported_dir(path: str) -> str:
    """An exported params directory, given it or a workdir that holds one."""
    candidate = os.path.join(path, EXPORT_DIR)
    return os.path.abspath(candidate if os.path.isdir(candidate) else path)


def load_params(config, path: str) -> tuple[Any, str]:
    """Backbone params of `config.model` from an exported directory, a workdir or a `.pth` file.

    Returns:
      `(params, resolved path)`; the path is what checkpoints reference and hash.
    """
    variant, overrides = config.model.variant, dict(config.model.get("overrides", {}))
    if path.endswith((".pth", ".pt")):
        key = config.init.get("torch_key") or None
        return models.from_torch(variant, path, key=key, **overrides), os.path.abspath(path)
    directory = _exported_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No exported params at {directory!r}: give a directory written by a previous run "
            f"(<workdir>/{EXPORT_DIR}), its workdir, or a PyTorch .pth file"
        )
    target = models.param_shapes(variant, **overrides)
    try:
        params = ocp.StandardCheckpointer().restore(directory, target)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Params in {directory!r} do not fit model {variant!r} {overrides or ''}: {error}"
        ) from error
    # Host arrays: orbax restores onto the devices the export was written from, which need not
    # be this run's mesh; the jitted init places them by the mesh's shardings instead.
    return jax.device_get(params), directory


def load_backbone(config) -> tuple[Any, str]:
    """The pre-trained backbone named by `config.init` (exactly one of checkpoint / torch)."""
    checkpoint, torch_path = config.init.get("checkpoint", ""), config.init.get("torch", "")
    if bool(checkpoint) == bool(torch_path):
        raise ValueError(
            "stage='finetune' needs exactly one of config.init.checkpoint (exported params or a "
            f"workdir) and config.init.torch (a .pth file); got checkpoint={checkpoint!r}, "
            f"torch={torch_path!r}"
        )
    return load_params(config, checkpoint or torch_path)


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
        raise ValueError(
            "stage='pretrain' trains every backbone parameter: method must be 'full' (or 'moe' "
            f"with moe.train='backbone'), got {config.method!r}"
        )


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
    if config.method == "multilora":  # composes trained LoRA runs (UIR-LoRA): its own stage
        from ir_lora.uir import run as multilora

        return multilora.train_and_evaluate(config, workdir)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.stage == "contributions":
        from ir_lora.colora import pipeline  # CoLoRA only: plotting and FAIG.

        return pipeline.compute(config, workdir)
    if config.method == "colora":
        from ir_lora.colora import pipeline

        config = pipeline.with_ranks(config, workdir, compute_missing=True)
    model = build_model(config)
    adaptation = build_adaptation(config, model)
    init_args, backbone_path = _init_args(config)
    shapes = models.param_shapes(config.model.variant, **dict(config.model.get("overrides", {})))
    report = adaptation.report(shapes)
    logging.info("Parameters (%s, method=%s):\n%s", config.model.variant, config.method, report)
    _write_text(os.path.join(workdir, "parameters.md"), report.to_markdown() + "\n")

    data_iterator = train_iterator(config, workdir)
    # A second iterator (same seed) supplies the fixed image-summary crops without moving the
    # training iterator, whose position is checkpointed.
    samples = next(train_iterator(config, workdir))
    state, frozen = trainer.train(
        config,
        workdir,
        method=adaptation.method,
        data_iterator=data_iterator,
        init_args=init_args,
        backbone_path=backbone_path,
        eval_fn=sample_images_fn(adaptation, samples, seed=config.seed),
    )
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


def _init_args(config) -> tuple[tuple, str | None]:
    """`(init_args, path)`: what `init_fn` gets after the key, and what checkpoints reference.

    A method with its own loader (`methods.LOADERS`, e.g. `moe`: backbone, modulation and router)
    uses it; otherwise a fine-tune loads the backbone of `config.init` and pre-training nothing.
    """
    loader = methods.LOADERS.get(config.method)
    if loader is not None:
        tree, path = loader(config, load_params)
        return (tree,), path
    if config.stage == "finetune":
        backbone, path = load_backbone(config)
        return (backbone,), path
    return (), None


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

    The backbone comes from `config.init` and is checked against the hash the checkpoint
    recorded. Returns `(variables, adaptation, step)`; `inference` turns them into a restore
    function and its params (adapters merged where the method allows).
    """
    if config.method == "colora":
        from ir_lora.colora import pipeline

        config = pipeline.with_ranks(config, workdir, compute_missing=False)
    model = build_model(config)
    adaptation = build_adaptation(config, model)
    init_args, backbone_path = _init_args(config)
    steps = int(config.num_train_steps)
    tx = train_lib.make_optimizer(config.optimizer, num_train_steps=steps)
    state, frozen, _, _ = train_lib.create_train_state(
        init_fn=adaptation.method.init_fn,
        tx=tx,
        rng=int(config.seed),
        mesh=sharding_lib.make_mesh(config),
        init_args=init_args,
    )
    manager = checkpointing.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    restored = checkpointing.restore(manager, state, backbone_path=backbone_path)
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
    if config.method == "multilora":
        if not workdir:
            raise ValueError("method='multilora' is evaluated from its workdir, not a checkpoint")
        from ir_lora.uir import run as multilora

        return multilora.evaluate(config, workdir, datasets=datasets, out_dir=out_dir)
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
