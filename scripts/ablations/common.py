"""Shared pieces of the CoLoRA ablations: data, pre-trainings, fine-tunes, CSV and charts.

Everything goes through the stage registry (`ir_lora.stages.registry`) with configs built from
`configs/` (as `train.py` runs them) and is cached in `--root`: a pre-training or fine-tune whose
workdir already holds its `result.json` is not run again, so the three scripts share one PROD
pre-training and one set of fine-tunes when given the same `--root` and sizes.

Data (offline, `ir_lora.data.synthetic`): every sample photograph but the held-out ones is a
training photograph; the clean pre-training set is those photographs, and the
novel-task training pairs are random `--pair-size` crops of them, degraded with a degradation PROD
never applies (haze, low light). The held-out photographs, degraded the same way, are the test
set. The pair sets are nested: the first 16 of the 32 pairs are the 16 pairs, and so on.
"""

import argparse
import csv
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import colora as colora_config
from configs import finetune_full, pretrain_prod
from ir_lora import degradations, models, services
from ir_lora.data import synthetic
from ir_lora.methods import full
from ir_lora.methods.colora import files, uniform_rank_for_budget
from ir_lora.stages import registry

TASKS = ("haze", "low_light")
# Degradation parameter ranges of the novel tasks, drawn uniformly per pair [R].
TASK_RANGES = {
    "haze": dict(beta=(0.8, 1.6), airlight=(0.75, 0.95), depth_mix=(0.3, 0.7)),
    "low_light": dict(gamma=(1.4, 2.2), gain=(0.25, 0.5), shot=(1e-3, 4e-3), read=(2e-3, 6e-3)),
}
PRETRAININGS = ("random_init", "fixed_order", "single", "prod")
PROD_MODES = {"fixed_order": "fixed_order", "single": "single", "prod": "random_order"}
TUNINGS = ("full", "lora_uniform", "colora", "decoder")


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every ablation takes; defaults are the CPU size (a few minutes per run)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--root", default="runs/ablations", help="cache of data and runs")
    p.add_argument("--out", default="docs/ablations", help="where the CSV and PNG go")
    p.add_argument("--tasks", default=",".join(TASKS), help="novel tasks, comma-separated")
    p.add_argument("--variant", default="nafnet-tiny", help="ir_lora.models variant")
    p.add_argument("--width", type=int, default=16, help="NAFNet width (0: the variant's)")
    p.add_argument("--enc", default="1,1,1", help="NAFNet enc_blk_nums ('' : the variant's)")
    p.add_argument("--middle", type=int, default=1, help="NAFNet middle_blk_num")
    p.add_argument("--dec", default="1,1,1", help="NAFNet dec_blk_nums")
    p.add_argument("--gt-size", type=int, default=64, help="training crop size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--probe-steps", type=int, default=100, help="CoLoRA's brief full fine-tune")
    p.add_argument("--faig-steps", type=int, default=8, help="FAIG Riemann steps")
    p.add_argument("--budget", type=float, default=0.07, help="CoLoRA budget fraction")
    p.add_argument("--adapter-lr", type=float, default=2e-3, help="LoRA / CoLoRA")
    p.add_argument("--full-lr", type=float, default=1e-3, help="full and decoder-only tuning")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--photos-max-side", type=int, default=192)
    p.add_argument("--pair-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    return p


def _model(config, args) -> None:
    config.model.variant = args.variant
    if args.width:
        config.model.overrides.width = args.width
    if args.enc:
        config.model.overrides.enc_blk_nums = tuple(int(n) for n in args.enc.split(","))
        config.model.overrides.middle_blk_num = args.middle
        config.model.overrides.dec_blk_nums = tuple(int(n) for n in args.dec.split(","))


def _tfds_dir(args, source_dir: str) -> str:
    # One prepared-data folder per source folder: `prepare` refuses to mix two sources.
    return os.path.join(os.path.abspath(args.root), "tfds", os.path.basename(source_dir))


def _apply_sizes(config, args, steps: int) -> None:
    config.unlock()
    _model(config, args)
    config.seed = args.seed
    config.data.gt_size = args.gt_size
    config.data.batch_size = args.batch_size
    config.num_train_steps = steps
    config.log_every_steps = max(1, steps // 4)
    config.checkpoint_every_steps = steps
    config.optimizer.warmup_steps = max(1, steps // 20)


# ---------------------------------------------------------------------------------------------
# Data.


def _degrade(task: str, key, clean: np.ndarray) -> np.ndarray:
    ranges = TASK_RANGES[task]
    keys = jax.random.split(key, len(ranges) + 1)
    draws = {
        name: jax.random.uniform(k, (), minval=lo, maxval=hi)
        for k, (name, (lo, hi)) in zip(keys[1:], ranges.items())
    }
    image = jnp.asarray(clean, jnp.float32) / 255.0
    op = degradations.haze if task == "haze" else degradations.low_light
    return synthetic.to_uint8(op(keys[0], image, **draws))


def clean_folder(args) -> str:
    """The pre-training photographs (held-out ones excluded)."""
    folder = os.path.join(os.path.abspath(args.root), "data", "clean")
    if not os.path.isdir(folder):
        train, _ = synthetic.photos(args.photos_max_side)
        synthetic.write_clean(folder, train)
    return folder


def task_folder(args, task: str, num_pairs: int) -> str:
    """`<root>/data/<task>_<n>` with `train/{lq,gt}` (n pairs) and `val/{lq,gt}` (held out)."""
    if task not in TASK_RANGES:
        raise ValueError(f"Unknown task {task!r}; known: {sorted(TASK_RANGES)}")
    folder = os.path.join(os.path.abspath(args.root), "data", f"{task}_{num_pairs}")
    if os.path.isdir(folder):
        return folder
    train, held_out = synthetic.photos(args.photos_max_side)
    rng = np.random.default_rng(args.seed)
    key = jax.random.fold_in(jax.random.key(args.seed), TASKS.index(task))
    for i, crop in synthetic.random_crops(train, num_pairs, args.pair_size, rng):
        lq = _degrade(task, jax.random.fold_in(key, i), crop)
        synthetic.write_pair(folder, "train", synthetic.pair_name(i), crop, lq)
    for j, name in enumerate(sorted(held_out)):
        lq = _degrade(task, jax.random.fold_in(key, 10_000 + j), held_out[name])
        synthetic.write_pair(folder, "val", f"{name}.png", held_out[name], lq)
    return folder


# ---------------------------------------------------------------------------------------------
# Runs.


def _claim(workdir: str) -> bool:
    """True if this process may run `workdir`; else waits until another process finished it.

    Lets the three scripts run at the same time on one `--root` (they share runs). The lock
    file holds the owner's pid; a lock whose owner is gone is taken over.
    """
    os.makedirs(workdir, exist_ok=True)
    lock = os.path.join(workdir, ".running")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if os.path.isfile(os.path.join(workdir, "result.json")):
                return False
            try:
                with open(lock) as f:
                    os.kill(int(f.read() or 0), 0)
            except (ProcessLookupError, ValueError):
                os.remove(lock)  # its owner died: run it here
                continue
            logging.info("Waiting for another process to finish %s", workdir)
            time.sleep(10)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def pretrain(args, kind: str) -> str:
    """The backbone of pre-training `kind` (`PRETRAININGS`), trained once; its export dir."""
    workdir = os.path.join(os.path.abspath(args.root), "pretrain", kind)
    export = os.path.join(workdir, services.EXPORT_DIR)
    if os.path.isfile(os.path.join(workdir, "result.json")) or not _claim(workdir):
        return export
    config = pretrain_prod.get_config()
    _apply_sizes(config, args, args.pretrain_steps)
    config.optimizer.lr = args.pretrain_lr
    config.data.source_dir = clean_folder(args)
    config.data.data_dir = _tfds_dir(args, config.data.source_dir)
    if kind == "random_init":
        model = services.build_model(config)
        x = jnp.zeros((1, args.gt_size, args.gt_size, 3), jnp.float32)
        services.export_params(model.init(jax.random.key(args.seed), x)["params"], export)
    else:
        config.prod.mode = PROD_MODES[kind]
        config.lock()
        logging.info("Pre-training %s", kind)
        registry.train(config, workdir)
    _write_json(os.path.join(workdir, "result.json"), {"kind": kind})
    return export


def _write_json(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def finetune_config(args, *, backbone: str, data: str, tuning: str, ranks: str = ""):
    """The config of one fine-tune (`TUNINGS`, or "none": the pre-trained model evaluated)."""
    if tuning in ("colora", "lora_uniform"):
        config = colora_config.get_config()
        _apply_sizes(config, args, args.finetune_steps)
        config.optimizer.lr = args.adapter_lr
        config.colora.ranks = ranks
        config.colora.budget_fraction = args.budget
        config.colora.probe_steps = args.probe_steps
        config.colora.probe_lr = args.full_lr
        config.colora.faig_steps = args.faig_steps
    elif tuning in ("full", "decoder", "none"):
        config = finetune_full.get_config()
        _apply_sizes(config, args, args.finetune_steps)
        config.optimizer.lr = args.full_lr
        config.full.train_only = full.DECODER_ONLY if tuning == "decoder" else ()
    else:
        raise ValueError(f"Unknown tuning {tuning!r}; known: {TUNINGS}")
    config.init.checkpoint = backbone
    config.data.source_dir = data
    config.data.data_dir = _tfds_dir(args, data)
    config.eval.datasets.val.source_dir = data
    config.eval.save_comparisons = False
    config.lock()
    return config


def _uniform_ranks(args, out: str) -> str:
    """A uniform-rank ranks file at CoLoRA's budget (`--budget` of the backbone).

    CoLoRA's allocation meets the same budget within its 1% tolerance, so the two runs train
    the same number of parameters up to that (both counts are in the results) without the
    uniform run waiting for CoLoRA's contributions.
    """
    config = finetune_full.get_config()
    _apply_sizes(config, args, 1)
    shapes = models.param_shapes(config.model.variant, **dict(config.model.overrides))
    allocation = uniform_rank_for_budget(shapes, budget_fraction=args.budget, tune_bias_norm=True)
    return files.save_allocation(allocation, out, tune_bias_norm=True)


def finetune(args, *, pretraining: str, task: str, num_pairs: int, tuning: str) -> dict:
    """One fine-tune (cached): `{"psnr", "ssim", "input_psnr", "trainable", "percent", ...}`."""
    backbone = pretrain(args, pretraining)
    data = task_folder(args, task, num_pairs)
    base = os.path.join(os.path.abspath(args.root), "finetune", pretraining, f"{task}_{num_pairs}")
    workdir = os.path.join(base, tuning)
    result_path = os.path.join(workdir, "result.json")
    if os.path.isfile(result_path) or not _claim(workdir):
        with open(result_path) as f:
            return json.load(f)
    ranks = ""
    if tuning == "lora_uniform":
        ranks = _uniform_ranks(args, f"{workdir}/ranks.json")
    config = finetune_config(args, backbone=backbone, data=data, tuning=tuning, ranks=ranks)
    logging.info("Fine-tuning %s / %s_%d / %s", pretraining, task, num_pairs, tuning)
    if tuning == "none":
        out = {"eval": registry.get(config).evaluate(
            config, checkpoint=backbone, out_dir=f"{workdir}/eval"
        )}  # fmt: skip
        out["report"] = None
    else:
        out = registry.train(config, workdir)
    mean = out["eval"]["datasets"]["val"]["mean"]
    report = out["report"]
    result = {
        "pretraining": pretraining,
        "task": task,
        "num_pairs": num_pairs,
        "tuning": tuning,
        "psnr": mean["psnr"],
        "ssim": mean["ssim"],
        "input_psnr": mean["input_psnr"],
        "trainable": report.trainable if report else 0,
        "percent": report.trainable_percent if report else 0.0,
        "steps": 0 if tuning == "none" else args.finetune_steps,
    }
    _write_json(result_path, result)
    return result


# ---------------------------------------------------------------------------------------------
# Output.


def write_csv(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def psnr_of(rows: list[dict], **match) -> float:
    """Mean PSNR of the rows whose fields equal `match` (e.g. over tasks)."""
    values = [r["psnr"] for r in rows if all(r[k] == v for k, v in match.items())]
    if not values:
        raise ValueError(f"No result row matches {match}")
    return float(np.mean(values))


def mean_over_tasks(rows: list[dict], key: str) -> dict:
    """`{row[key]: mean PSNR over tasks}` (rows of one setting per task)."""
    out = {}
    for value in dict.fromkeys(r[key] for r in rows):
        psnrs = [r["psnr"] for r in rows if r[key] == value]
        out[value] = float(np.mean(psnrs))
    return out


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # A full report per run is in its workdir; keep the console to this script's lines.
    for name in ("absl", "jax", "orbax", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
