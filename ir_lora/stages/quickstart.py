"""The `quickstart` stage (configs/quickstart.py): pre-train, fine-tune on haze, compare.

Everything runs through the same code as `train.py` with the `pretrain` and `finetune` configs
(`ir_lora.stages.training`): this module only writes the data folders (`ir_lora.data.synthetic`),
chains the two runs, evaluates the pre-trained model on the held-out hazy photographs for the
comparison table, and restores those photographs with the `ir-lora-restore` command, as a user
then restores their own. `evaluate` (eval.py) re-scores a finished quickstart workdir.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora import degradations, models, services
from ir_lora.data import synthetic
from ir_lora.stages import training


def _hazy(key, clean: np.ndarray, ranges) -> np.ndarray:
    """One hazy version of a uint8 image, parameters drawn uniformly from `ranges`."""
    keys = jax.random.split(key, 4)
    draw = lambda k, bounds: jax.random.uniform(k, (), minval=bounds[0], maxval=bounds[1])
    image = jnp.asarray(clean, jnp.float32) / 255.0
    out = degradations.haze(
        keys[0],
        image,
        beta=draw(keys[1], ranges["beta"]),
        airlight=draw(keys[2], ranges["airlight"]),
        depth_mix=draw(keys[3], ranges["depth_mix"]),
    )
    return synthetic.to_uint8(out)


def write_data(config, root: str) -> dict[str, str]:
    """Clean training photographs, `num_pairs` haze training pairs and held-out haze pairs.

    Returns:
      `{"clean": folder, "haze": folder}` for the `images` and `paired` dataset kinds.
    """
    train, held_out = synthetic.photos(config.photos_max_side, tuple(config.eval_photos))
    clean_dir, haze_dir = os.path.join(root, "clean"), os.path.join(root, "haze")
    synthetic.write_clean(clean_dir, train)
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    for i, crop in synthetic.random_crops(train, config.num_pairs, config.pair_size, rng):
        hazy = _hazy(jax.random.fold_in(key, i), crop, config.haze)
        synthetic.write_pair(haze_dir, "train", synthetic.pair_name(i), crop, hazy)
    for j, name in enumerate(sorted(held_out)):
        hazy = _hazy(jax.random.fold_in(key, 1000 + j), held_out[name], config.haze)
        synthetic.write_pair(haze_dir, "val", f"{name}.png", held_out[name], hazy)
    return {"clean": clean_dir, "haze": haze_dir}


def summary_table(
    title: str,
    header,
    rows,
    report,
    *,
    trained: str,
    label: str = "Trainable parameters",
) -> str:
    """A results table of the offline experiments: title, markdown table, trainable share.

    Args:
      title: the line above the table.
      header: the column names.
      rows: one sequence of cells per row (formatted with `str`).
      report: the run's `ParameterReport`.
      trained: what trains, for the parameter line.
      label: how the parameter line starts.
    """

    def cell_line(cells) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    lines = [title, "", cell_line(header), "|" + "---|" * len(header)]
    lines += [cell_line(row) for row in rows]
    lines += [
        "",
        f"{label}: {report.trainable:,} of {report.base:,} "
        f"({report.trainable_percent:.2f}% of the backbone; {trained}).",
    ]
    return "\n".join(lines)


# What trains, per fine-tuning method, for the summary line.
_TRAINED = {
    "lora": ("LoRA", "LoRA factors plus biases and norms"),
    "adaptir": ("AdaptIR", "AdaptIR adapters beside every feed-forward path"),
    "full": ("full fine-tuning", "every parameter"),
}


def summary(
    pretrained: dict, finetuned: dict, report, method: str = "lora", num_pairs: int = 16
) -> str:
    """The quickstart's result table (held-out hazy photographs, mean over images)."""
    label, trained = _TRAINED.get(method, (method, method))
    base = pretrained["datasets"]["haze"]["mean"]
    tuned = finetuned["datasets"]["haze"]["mean"]
    n = finetuned["datasets"]["haze"]["num_images"]

    def row(name: str, mean: dict, key: str) -> tuple[str, str, str]:
        return name, f"{mean[key + 'psnr']:.2f}", f"{mean[key + 'ssim']:.4f}"

    return summary_table(
        f"Held-out hazy photographs ({n} images), mean PSNR (dB) / SSIM, BasicSR conventions:",
        ("model", "PSNR", "SSIM"),
        [
            row("degraded input", base, "input_"),
            row("PROD pre-trained (never saw haze)", base, ""),
            row(f"+ {label} fine-tuned on {num_pairs} haze pairs", tuned, ""),
        ],
        report,
        trained=trained,
    )


def stage_configs(config, workdir: str):
    """The pre-training and fine-tuning configs pointed at `workdir`'s data and runs."""
    workdir = os.path.abspath(workdir)
    data, tfds_dir = os.path.join(workdir, "data"), os.path.join(workdir, "tfds")
    pretrain = config.pretrain
    with pretrain.unlocked():
        pretrain.data.source_dir = os.path.join(data, "clean")
        pretrain.data.data_dir = tfds_dir
    finetune = config.finetune
    with finetune.unlocked():
        finetune.init.checkpoint = os.path.join(workdir, "pretrain")
        finetune.data.source_dir = os.path.join(data, "haze")
        finetune.data.data_dir = tfds_dir
        finetune.eval.datasets.haze.source_dir = os.path.join(data, "haze")
    return pretrain, finetune


def _pretrained_results(finetune, workdir: str) -> dict:
    return training.evaluate(
        finetune,
        checkpoint=os.path.join(workdir, "pretrain"),
        out_dir=os.path.join(workdir, "pretrain", "eval_haze"),
    )


def _finish(config, workdir: str, pretrained: dict, tuned: dict, report) -> str:
    text = summary(
        pretrained, tuned, report, method=config.finetune.method, num_pairs=config.num_pairs
    )
    with open(os.path.join(workdir, "quickstart.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nPer-image tables and comparison grids: {workdir}/finetune/eval")
    return text


def restore_held_out(workdir: str) -> str:
    """Restores the held-out hazy photographs with `ir-lora-restore`; returns the output folder.

    The outputs belong to this run, so they are replaced when the quickstart runs again.
    """
    from ir_lora.restore import cli  # the restore command, only for this last step

    hazy = os.path.join(workdir, "data", "haze", "val", "lq")
    restored = os.path.join(workdir, "restored")
    argv = ["--input", hazy, "--output", restored, "--workdir", workdir, "--overwrite"]
    logging.info("ir-lora-restore %s", " ".join(argv))
    status = cli.main(argv)
    if status != cli.EXIT_OK:
        raise RuntimeError(f"ir-lora-restore {' '.join(argv)} exited with status {status}")
    print(f"Held-out hazy photographs restored by ir-lora-restore: {restored}")
    return restored


def run(config, workdir: str) -> str:
    """Runs the whole quickstart in `workdir` and returns the summary table (also printed)."""
    workdir = os.path.abspath(workdir)
    write_data(config, os.path.join(workdir, "data"))
    pretrain, finetune = stage_configs(config, workdir)
    logging.info("Quickstart 1/4: PROD pre-training")
    training.train_and_evaluate(pretrain, os.path.join(workdir, "pretrain"))
    logging.info("Quickstart 2/4: %s fine-tuning on haze", finetune.method)
    tuned = training.train_and_evaluate(finetune, os.path.join(workdir, "finetune"))
    logging.info("Quickstart 3/4: the pre-trained model on the same held-out images")
    pretrained = _pretrained_results(finetune, workdir)
    text = _finish(config, workdir, pretrained, tuned["eval"], tuned["report"])
    logging.info("Quickstart 4/4: restoring the held-out photographs with ir-lora-restore")
    restore_held_out(workdir)
    return text


def evaluate(config, *, workdir=None, checkpoint=None, datasets=None, out_dir=None) -> str:
    """Re-scores a finished quickstart `workdir` (eval.py): the same table, from checkpoints."""
    if not workdir or checkpoint or datasets or out_dir:
        raise ValueError("stage 'quickstart' is evaluated from its --workdir only")
    workdir = os.path.abspath(workdir)
    _, finetune = stage_configs(config, workdir)
    tuned = training.evaluate(finetune, workdir=os.path.join(workdir, "finetune"))
    shapes = models.param_shapes(finetune.model.variant, **dict(finetune.model.overrides))
    report = services.build_adaptation(finetune, services.build_model(finetune)).report(shapes)
    return _finish(config, workdir, _pretrained_results(finetune, workdir), tuned, report)
