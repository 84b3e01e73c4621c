"""The `uir_lora` stage of `train.py` / `eval.py` (UIR-LoRA): compose trained LoRA runs.

The LoRAs themselves are ordinary `method = lora` runs, one per degradation, each on its own data,
all from the same backbone, with LoRA factors only (`lora.tune_bias_norm = False`, no
`also_train`: a per-degradation bias could not be composed per image). `config.uir_lora.runs`
names their workdirs (name -> workdir). The stage then

1. loads the backbone (`config.init`) and each run's newest checkpoint, unmerged; every run's
   checkpoint must have recorded this backbone's hash, and all runs the same LoRA targets/ranks;
2. trains the degradation encoder on the runs' own degraded training images, labelled by run,
   through `trainer.train` (checkpoints in the workdir, exact resume, TensorBoard), and takes
   one prototype per run (`prototypes.degradation_prototypes`);
3. writes `<workdir>/uir_lora/` (stacked LoRAs, encoder, prototypes) and `uir_lora.json`;
4. evaluates `config.eval.datasets` with the composition and, for comparison, every single LoRA
   (one-hot weights: exactly that LoRA), their uniform average and the bare backbone.

`eval.py --workdir <uir_lora workdir>` repeats step 4 from the saved files.
"""

import json
import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ir_lora import checkpointing, services, trainer
from ir_lora.data import prepare as prepare_dataset
from ir_lora.data import synthetic
from ir_lora.methods import lora as lora_method
from ir_lora.methods.uir_lora import compose, prototypes
from ir_lora.peft import lora as lora_lib

SAVED_DIR, INFO_FILE = "uir_lora", "uir_lora.json"


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run recorded in its newest checkpoint."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    metadata = checkpointing.latest_metadata(directory)
    if metadata is None:
        raise FileNotFoundError(f"uir_lora: no checkpoint in {directory!r} (train the LoRA first)")
    return ml_collections.ConfigDict(metadata["extra"]["config"])


def _check_run(name: str, workdir: str, run: ml_collections.ConfigDict, config) -> None:
    where = f"uir_lora.runs.{name} ({workdir})"
    if run.get("method") != "lora":
        raise ValueError(f"{where}: method must be 'lora', got {run.get('method')!r}")
    if run.lora.tune_bias_norm or tuple(run.lora.get("also_train", ())):
        raise ValueError(
            f"{where} trained more than LoRA factors (lora.tune_bias_norm / lora.also_train): "
            "only low-rank factors can be composed per image; retrain with "
            "lora.tune_bias_norm=False"
        )
    ours = (config.model.variant, dict(config.model.get("overrides", {})))
    theirs = (run.model.variant, dict(run.model.get("overrides", {})))
    as_tuples = lambda d: {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()}
    if ours[0] != theirs[0] or as_tuples(ours[1]) != as_tuples(theirs[1]):
        raise ValueError(f"{where}: model {theirs} is not this config's model {ours}")


def load_runs(config, backbone_path: str):
    """`(names, stacked LoRA tree, LoraConfig, run configs)` of `config.uir_lora.runs`."""
    names = list(config.uir_lora.runs)
    if not names:
        raise ValueError("uir_lora: config.uir_lora.runs names no LoRA run (name -> workdir)")
    trees, lora_configs, runs = [], [], []
    for name in names:
        workdir = config.uir_lora.runs[name]
        run = run_config(workdir)
        _check_run(name, workdir, run, config)
        with run.unlocked():  # restore against *our* backbone: its hash must match the run's
            run.init.checkpoint, run.init.torch = backbone_path, ""
        variables, _, step = services.restore_trained(run, workdir)
        logging.info("uir_lora: LoRA %r from %s (step %d)", name, workdir, step)
        trees.append(variables[lora_lib.COLLECTION])
        lora_configs.append(lora_method.lora_config(run.lora))
        runs.append(run)
    for name, lora_config in zip(names[1:], lora_configs[1:]):
        if lora_config != lora_configs[0]:
            raise ValueError(
                f"uir_lora: run {name!r} has LoRA targets {lora_config}, run {names[0]!r} "
                f"{lora_configs[0]}: composition needs the same targets, ranks and alpha"
            )
    return names, compose.stack(trees, names), lora_configs[0], runs


def _degraded_images(run, workdir: str) -> list[np.ndarray]:
    source = prepare_dataset(
        run.data.dataset,
        source_dir=run.data.source_dir,
        data_dir=run.data.get("data_dir") or os.path.join(os.path.abspath(workdir), "tfds"),
        split=run.data.split,
    )
    if "lq" not in source[0]:
        raise ValueError(f"uir_lora: the data of run {workdir!r} has no degraded images ('lq')")
    return [np.asarray(source[i]["lq"], np.float32) / 255.0 for i in range(len(source))]


def train_encoder(config, workdir: str, images, backbone_path: str):
    """The degradation encoder trained by the trainer in `workdir`: `(model, params, metrics)`."""
    section = config.uir_lora.encoder
    model = prototypes.encoder(len(images), widths=section.widths, embed_dim=section.embed_dim)
    dataset = prototypes.encoder_dataset(
        images,
        crop=int(section.crop),
        global_batch_size=int(section.batch_size),
        seed=int(config.seed),
    )
    log = []
    state, _ = trainer.train(
        config,
        workdir,
        method=prototypes.encoder_method(model, crop=int(section.crop)),
        data_iterator=iter(dataset),
        backbone_path=backbone_path,
        metrics_log=log,
    )
    return model, jax.device_get(state.trainable), (log[-1] if log else {})


def train_and_evaluate(config, workdir: str) -> dict:
    """The `uir_lora` stage (module docstring).

    Returns:
      `{"eval": the composition's results, "variants": {variant: results}}` (None without
      `config.eval.datasets`).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    backbone, backbone_path = services.load_backbone(config)
    names, stacked, lora_config, runs = load_runs(config, backbone_path)
    images = [_degraded_images(r, config.uir_lora.runs[n]) for n, r in zip(names, runs)]
    model, encoder_params, metrics = train_encoder(config, workdir, images, backbone_path)
    logging.info("uir_lora: degradation encoder trained, last logged %s", metrics)
    anchors = prototypes.degradation_prototypes(model, encoder_params, images)
    bundle = {"loras": stacked, "encoder": encoder_params, "prototypes": anchors}
    services.export_params(bundle, os.path.join(workdir, SAVED_DIR))
    info = {
        "names": names,
        "runs": {n: os.path.abspath(config.uir_lora.runs[n]) for n in names},
        "backbone": checkpointing.backbone_reference(backbone_path),
        "lora_targets": [list(t) for t in lora_config.targets],
        "lora_alpha": lora_config.alpha,
        "encoder_metrics": metrics,
    }
    with open(os.path.join(workdir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    variants = None
    if config.eval.datasets:
        variants = evaluate_bundle(config, workdir, backbone, bundle, names, lora_config)
    return {"eval": variants and variants["composition"], "variants": variants}


def load_bundle(config, workdir: str):
    """`(backbone, bundle, names, LoraConfig)` saved by `train_and_evaluate` in `workdir`."""
    workdir = os.path.abspath(workdir)
    with open(os.path.join(workdir, INFO_FILE)) as f:
        info = json.load(f)
    backbone, backbone_path = services.load_backbone(config)
    checkpointing.verify_backbone(info["backbone"], backbone_path)
    bundle = ocp.StandardCheckpointer().restore(os.path.join(workdir, SAVED_DIR))
    lora_config = lora_lib.LoraConfig(
        targets=tuple((p, int(r)) for p, r in info["lora_targets"]), alpha=info["lora_alpha"]
    )
    return backbone, bundle, info["names"], lora_config


def restore_fns(config, names, lora_config) -> dict:
    """`{variant: restore_fn(params, images)}`: the routed composition and fixed-weight ones."""
    model = services.build_model(config)
    section = config.uir_lora
    encoder = prototypes.encoder(
        len(names), widths=section.encoder.widths, embed_dim=section.encoder.embed_dim
    )

    def composed(p, x):
        embedding = encoder.apply({"params": p["encoder"]}, x)[0]
        weights = prototypes.composition_weights(
            embedding,
            p["prototypes"],
            k=section.k,
            temperature=section.temperature,
            normalize=section.normalize,
            center=section.center,
        )
        return compose.apply(
            model, p["params"], p["loras"], weights, x, config=lora_config, path=section.path
        )

    def fixed(weights):
        def restore(p, x):
            w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (x.shape[0], len(names)))
            return compose.apply(
                model, p["params"], p["loras"], w, x, config=lora_config, path=section.path
            )

        return restore

    fns = {"base": lambda p, x: model.apply({"params": p["params"]}, x)}
    for i, name in enumerate(names):
        fns[f"lora:{name}"] = fixed(np.eye(len(names))[i])
    fns["uniform"] = fixed(np.full(len(names), 1.0 / len(names)))
    fns["composition"] = composed
    return fns


def evaluate_bundle(
    config, workdir, backbone, bundle, names, lora_config, *, datasets=None, out_dir=None
) -> dict:
    """Every variant of `restore_fns` on `config.eval.datasets` (or `datasets` of them).

    Writes each variant's tables under `<out_dir>/<variant>/` and the per-group comparison to
    `<out_dir>/uir_lora.md` (default out_dir: `<workdir>/eval`). Returns `{variant: results}`.
    """
    out_dir = out_dir or os.path.join(workdir, "eval")
    inputs = services.eval_datasets(config, workdir, datasets)
    params = {**bundle, "params": backbone}
    results = {}
    for variant, fn in restore_fns(config, names, lora_config).items():
        where = os.path.join(out_dir, variant.replace(":", "_"))
        results[variant] = services.run_evaluation(config, fn, params, inputs, where)
    table = group_table(results) + "\n\n" + routing_table(config, names, bundle, inputs)
    with open(os.path.join(out_dir, "uir_lora.md"), "w") as f:
        f.write(table + "\n")
    logging.info("uir_lora:\n%s", table)
    return results


def evaluate(config, *, workdir=None, checkpoint=None, datasets=None, out_dir=None) -> dict:
    """`eval.py --workdir` for a `uir_lora` run: the saved composition's results (and the
    comparison variants' tables, written beside them)."""
    if not workdir or checkpoint:
        raise ValueError("stage 'uir_lora' is evaluated from its --workdir, not a checkpoint")
    backbone, bundle, names, lora_config = load_bundle(config, workdir)
    results = evaluate_bundle(
        config,
        os.path.abspath(workdir),
        backbone,
        bundle,
        names,
        lora_config,
        datasets=datasets,
        out_dir=out_dir,
    )
    return results["composition"]


def group_table(results: Mapping[str, dict]) -> str:
    """Markdown PSNR / SSIM per image group (`synthetic.group_of` the name) and variant.

    The first row is the degraded input itself (from the first variant's results).
    """
    per_variant, groups = {}, []
    first = next(iter(results.values()), None)
    sources = [("input (degraded)", first, "input_")] if first else []
    for variant, result, prefix in sources + [(v, r, "") for v, r in results.items()]:
        rows = {}
        for dataset in result["datasets"].values():
            for image in dataset["images"]:
                group = synthetic.group_of(image["name"])
                rows.setdefault(group, []).append((image[prefix + "psnr"], image[prefix + "ssim"]))
                if group not in groups:
                    groups.append(group)
        per_variant[variant] = rows
    header = "| variant | " + " | ".join(groups) + " | mean |"
    lines = [
        "PSNR (dB) / SSIM per degradation group, mean over each group's images; 'mean' averages "
        "the groups.",
        "",
        header,
        "|" + "---|" * (len(groups) + 2),
    ]
    for variant, rows in per_variant.items():
        cells, psnrs, ssims = [], [], []
        for group in groups:
            p, s = np.mean([r[0] for r in rows[group]]), np.mean([r[1] for r in rows[group]])
            psnrs.append(p)
            ssims.append(s)
            cells.append(f"{p:.2f} / {s:.4f}")
        cells.append(f"{np.mean(psnrs):.2f} / {np.mean(ssims):.4f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(config, names, bundle, inputs) -> str:
    """Markdown: the mean composition weight of each LoRA per image group (the router at work)."""
    section = config.uir_lora
    encoder = prototypes.encoder(
        len(names), widths=section.encoder.widths, embed_dim=section.encoder.embed_dim
    )
    per_group = {}
    for dataset in inputs.values():
        for i in range(len(dataset)):
            example = dataset[i]
            name = example["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            image = jnp.asarray(example["lq"], jnp.float32)[None] / 255.0
            weights = prototypes.composition_weights(
                prototypes.embed(encoder, bundle["encoder"], image),
                jnp.asarray(bundle["prototypes"]),
                k=section.k,
                temperature=section.temperature,
                normalize=section.normalize,
                center=section.center,
            )
            group = synthetic.group_of(name)
            per_group.setdefault(group, []).append(np.asarray(weights[0]))
    lines = [
        "Mean composition weight per LoRA (rows: test image groups).",
        "",
        "| group | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for group, rows in per_group.items():
        mean = np.mean(rows, axis=0)
        lines.append(f"| {group} | " + " | ".join(f"{w:.2f}" for w in mean) + " |")
    return "\n".join(lines)
