"""The offline quickstart (configs/quickstart.py): pre-train, fine-tune on haze, compare.

Everything runs through the same code as `train.py` with the `pretrain` and `finetune` configs:
this module only writes the data folders, chains the two runs, and evaluates the pre-trained model
on the held-out hazy photographs for the comparison table.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ir_lora import degradations, runner
from ir_lora.data import samples


def _save(path: str, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _to_uint8(x) -> np.ndarray:
    return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0), np.uint8)


def _shrink(pixels: np.ndarray, max_side: int) -> np.ndarray:
    img = Image.fromarray(pixels)
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img)


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
    return _to_uint8(out)


def write_data(config, root: str) -> dict[str, str]:
    """Clean training photographs, 16 haze training pairs and held-out haze pairs under `root`.

    Returns:
      `{"clean": folder, "haze": folder}` for the `images` and `paired` dataset kinds.
    """
    photos = {n: _shrink(p, config.photos_max_side) for n, p in samples.sample_photos()}
    held_out = set(config.eval_photos)
    unknown = held_out - set(photos)
    if unknown:
        raise ValueError(f"eval_photos {sorted(unknown)} are not sample photographs {list(photos)}")
    train = {n: p for n, p in photos.items() if n not in held_out}
    clean_dir, haze_dir = os.path.join(root, "clean"), os.path.join(root, "haze")
    for name, pixels in train.items():
        _save(os.path.join(clean_dir, f"{name}.png"), pixels)

    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    names = sorted(train)
    size = config.pair_size
    for i in range(config.num_pairs):
        pixels = train[names[i % len(names)]]
        top = rng.integers(0, pixels.shape[0] - size + 1)
        left = rng.integers(0, pixels.shape[1] - size + 1)
        crop = np.ascontiguousarray(pixels[top : top + size, left : left + size])
        name = f"pair{i:02d}.png"
        _save(os.path.join(haze_dir, "train", "gt", name), crop)
        _save(
            os.path.join(haze_dir, "train", "lq", name),
            _hazy(jax.random.fold_in(key, i), crop, config.haze),
        )
    for j, name in enumerate(sorted(held_out)):
        pixels = photos[name]
        hazy = _hazy(jax.random.fold_in(key, 1000 + j), pixels, config.haze)
        _save(os.path.join(haze_dir, "val", "gt", f"{name}.png"), pixels)
        _save(os.path.join(haze_dir, "val", "lq", f"{name}.png"), hazy)
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


def run(config, workdir: str) -> str:
    """Runs the whole quickstart in `workdir` and returns the summary table (also printed)."""
    workdir = os.path.abspath(workdir)
    folders = write_data(config, os.path.join(workdir, "data"))

    tfds_dir = os.path.join(workdir, "tfds")
    pretrain = config.pretrain
    with pretrain.unlocked():
        pretrain.data.source_dir = folders["clean"]
        pretrain.data.data_dir = tfds_dir
    logging.info("Quickstart 1/3: PROD pre-training")
    runner.train_and_evaluate(pretrain, os.path.join(workdir, "pretrain"))

    finetune = config.finetune
    with finetune.unlocked():
        finetune.init.checkpoint = os.path.join(workdir, "pretrain")
        finetune.data.source_dir = folders["haze"]
        finetune.data.data_dir = tfds_dir
        finetune.eval.datasets.haze.source_dir = folders["haze"]
    logging.info("Quickstart 2/3: %s fine-tuning on haze", finetune.method)
    tuned = runner.train_and_evaluate(finetune, os.path.join(workdir, "finetune"))

    logging.info("Quickstart 3/3: the pre-trained model on the same held-out images")
    pretrained = runner.evaluate(
        finetune,
        checkpoint=os.path.join(workdir, "pretrain"),
        out_dir=os.path.join(workdir, "pretrain", "eval_haze"),
    )
    text = summary(
        pretrained,
        tuned["eval"],
        tuned["report"],
        method=finetune.method,
        num_pairs=config.num_pairs,
    )
    with open(os.path.join(workdir, "quickstart.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nPer-image tables and comparison grids: {workdir}/finetune/eval")
    return text
