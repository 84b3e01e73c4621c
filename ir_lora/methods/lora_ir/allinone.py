"""The `lora_ir_allinone` stage (configs/lora_ir_allinone.py): LoRA-IR's three stages, then a
mixed-degradation test set scored per degradation, with the router's accuracy.

Data (no download, `ir_lora.data.synthetic`): scikit-image's photographs. The training
photographs give clean crops that PROD degrades on the device with one degradation per crop from
`classes`. The held-out photographs are cut into tiles and each tile gets a different
degradation (tile i gets class i mod K, parameters drawn from PROD's ranges), so the test set
mixes every class. File names are `<class>__<photo>_<i>.png` (`synthetic.group_name`), which is
how results are grouped.

Stages (each exactly what `train.py` runs with the corresponding config):
1. router (configs/lora_ir_router.py), 2. backbone + modulation with the router embedding
(configs/lora_ir_backbone.py), 3. experts + modulation only (configs/lora_ir_experts.py).
Stage 2's model is evaluated on the same test set, so the table shows what the experts add.
"""

import collections
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ir_lora import degradations, models, services
from ir_lora.data import synthetic
from ir_lora.methods.lora_ir import router_stage, routing
from ir_lora.stages import quickstart, training

# Sub-directories of the workdir, in training order.
STAGES = ("router", "backbone", "experts")


def degrade_one(key, clean: np.ndarray, name: str, prod_config) -> np.ndarray:
    """One uint8 image with the single degradation `name` (parameters from PROD's ranges)."""
    prod = router_stage.single_degradation_config(prod_config, [name])
    image = jnp.asarray(clean, jnp.float32)[None] / 255.0
    out, labels = degradations.prod(key, image, prod)
    if float(labels["present"][0, degradations.NAMES.index(name)]) != 1.0:
        raise AssertionError(f"PROD did not apply {name!r}")
    return synthetic.to_uint8(out[0])


def write_data(config, root: str) -> dict[str, str]:
    """Clean training photographs and the mixed test pairs under `root`."""
    train, held_out = synthetic.photos(config.photos_max_side, tuple(config.eval_photos))
    clean_dir, mixed_dir = os.path.join(root, "clean"), os.path.join(root, "mixed")
    synthetic.write_clean(clean_dir, train)
    classes, size = list(config.classes), int(config.tile_size)
    key = jax.random.key(int(config.seed))
    count = 0
    for photo in sorted(held_out):
        pixels = held_out[photo]
        rows, cols = pixels.shape[0] // size, pixels.shape[1] // size
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            tile = np.ascontiguousarray(
                pixels[r * size : (r + 1) * size, c * size : (c + 1) * size]
            )
            name = classes[count % len(classes)]
            lq = degrade_one(jax.random.fold_in(key, count), tile, name, config.prod)
            synthetic.write_pair(mixed_dir, "val", synthetic.group_name(name, photo, i), tile, lq)
            count += 1
    return {"clean": clean_dir, "mixed": mixed_dir}


def per_degradation(results: dict, dataset: str = "mixed") -> dict[str, dict[str, float]]:
    """`{class: {"psnr", "ssim", "input_psnr", "n"}}` from per-image rows named by group."""
    groups = collections.defaultdict(list)
    for row in results["datasets"][dataset]["images"]:
        groups[synthetic.group_of(row["name"])].append(row)
    out = {}
    for name, rows in sorted(groups.items()):
        out[name] = {
            k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "input_psnr")
        }
        out[name]["n"] = len(rows)
    return out


def test_routing_accuracy(router_config, classes, folder: str) -> tuple[float, dict]:
    """Top-1 routing accuracy over `classes` on the test inputs (overall and per class)."""
    params, _ = routing.load_router(router_config)
    model = routing.build_router(router_config)
    lq_dir = os.path.join(folder, "val", "lq")
    hits = collections.Counter()
    totals = collections.Counter()
    for file in sorted(os.listdir(lq_dir)):
        truth = synthetic.group_of(file)
        image = np.asarray(Image.open(os.path.join(lq_dir, file)).convert("RGB"), np.float32)
        _, logits = model.apply({"params": params}, jnp.asarray(image[None] / 255.0))
        predicted = classes[int(routing.predicted_class(logits, classes)[0])]
        hits[truth] += predicted == truth
        totals[truth] += 1
    per_class = {c: hits[c] / totals[c] for c in sorted(totals)}
    return sum(hits.values()) / sum(totals.values()), per_class


def _stage(section, updates: dict):
    with section.unlocked():
        for dotted, value in updates.items():
            *parents, leaf = dotted.split(".")
            node = section
            for p in parents:
                node = node[p]
            node[leaf] = value
    return section


def stage_configs(config, workdir: str) -> dict:
    """The stage sections of `config` pointed at `workdir`'s data and stage directories.

    Returns `{"router", "backbone", "experts"}` (the sections, updated in place) plus their
    `dirs` and the data `folders`; both training (`run`) and `evaluate` use it, so they read
    and write the same places.
    """
    workdir = os.path.abspath(workdir)
    data = os.path.join(workdir, "data")
    folders = {"clean": os.path.join(data, "clean"), "mixed": os.path.join(data, "mixed")}
    dirs = {name: os.path.join(workdir, name) for name in STAGES}
    data = {"data.data_dir": os.path.join(workdir, "tfds"), "data.source_dir": folders["clean"]}
    common = {**data, "router.checkpoint": dirs["router"]}
    mixed_eval = {"eval.datasets.mixed.source_dir": folders["mixed"]}
    return {
        "router": _stage(config.router_stage, data),
        "backbone": _stage(config.backbone, {**common, **mixed_eval}),
        "experts": _stage(
            config.experts, {**common, **mixed_eval, "init.checkpoint": dirs["backbone"]}
        ),
        "dirs": dirs,
        "folders": folders,
    }


def summary(classes, stage2: dict, stage3: dict, accuracy, per_class, report) -> str:
    """The all-in-one table: per-class input, stage 2 and stage 3 PSNR/SSIM, routing accuracy."""
    rows = []
    for name in classes:
        a, b = stage2[name], stage3[name]
        rows.append(
            (
                name,
                b["n"],
                f"{a['input_psnr']:.2f}",
                f"{a['psnr']:.2f} / {a['ssim']:.4f}",
                f"{b['psnr']:.2f} / {b['ssim']:.4f}",
                f"{per_class.get(name, 0.0):.2f}",
            )
        )
    mean = lambda d, k: float(np.mean([d[c][k] for c in classes]))  # noqa: E731
    rows.append(
        (
            "mean over classes",
            "",
            f"{mean(stage2, 'input_psnr'):.2f}",
            f"{mean(stage2, 'psnr'):.2f} / {mean(stage2, 'ssim'):.4f}",
            f"{mean(stage3, 'psnr'):.2f} / {mean(stage3, 'ssim'):.4f}",
            f"{accuracy:.2f}",
        )
    )
    return quickstart.summary_table(
        "Mixed-degradation test set (held-out photographs, each tile one degradation), "
        "PSNR (dB) / SSIM per degradation, BasicSR conventions:",
        (
            "degradation",
            "tiles",
            "degraded input",
            "stage 2: backbone + DAM",
            "stage 3: + experts",
            "routing acc.",
        ),
        rows,
        report,
        trained="experts plus modulation",
        label="Stage 3 trainable parameters",
    )


def _parameter_report(config):
    """What the training stage reports for `config`, from shapes only."""
    model = services.build_model(config)
    shapes = models.param_shapes(config.model.variant, **dict(config.model.get("overrides", {})))
    return services.build_adaptation(config, model).report(shapes)


def _finish(stages, stage2: dict, stage3: dict, out_dir: str) -> str:
    """Routing accuracy on the test inputs, the table, `allinone.{md,json}` in `out_dir`."""
    classes = list(stages["experts"].lora_ir.classes)
    accuracy, per_class = test_routing_accuracy(
        stages["experts"].router, classes, stages["folders"]["mixed"]
    )
    text = summary(
        classes,
        per_degradation(stage2),
        per_degradation(stage3),
        accuracy,
        per_class,
        _parameter_report(stages["experts"]),
    )
    with open(os.path.join(stages["dirs"]["router"], "router.json")) as f:
        router = json.load(f)
    text += (
        f"\nRouter: training-crop routing accuracy {router['routing_accuracy']:.3f}; "
        f"stage-2 trainable parameters {_parameter_report(stages['backbone']).trainable:,}."
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "allinone.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "allinone.json"), "w") as f:
        json.dump(
            {
                "stage2": per_degradation(stage2),
                "stage3": per_degradation(stage3),
                "routing_accuracy": accuracy,
                "routing_accuracy_per_class": per_class,
            },
            f,
            indent=1,
        )
    print(text)
    return text


def run(config, workdir: str) -> str:
    """Runs the three stages and the evaluation in `workdir`; returns the summary table."""
    workdir = os.path.abspath(workdir)
    write_data(config, os.path.join(workdir, "data"))
    stages = stage_configs(config, workdir)
    dirs = stages["dirs"]

    logging.info("All-in-one 1/3: the degradation router")
    router_stage.train(stages["router"], dirs["router"])
    logging.info("All-in-one 2/3: backbone + modulation with the router embedding")
    stage2 = training.train_and_evaluate(stages["backbone"], dirs["backbone"])
    logging.info("All-in-one 3/3: experts (and modulation) only")
    stage3 = training.train_and_evaluate(stages["experts"], dirs["experts"])
    return _finish(stages, stage2["eval"], stage3["eval"], workdir)


def _check_complete(stages) -> None:
    """Raises FileNotFoundError naming the first stage (or data) directory a run lacks."""
    dirs = stages["dirs"]
    needed = [
        ("router", os.path.join(dirs["router"], routing.EXPORT_DIR)),
        ("router", os.path.join(dirs["router"], "router.json")),
        ("backbone", os.path.join(dirs["backbone"], "checkpoints")),
        ("backbone", os.path.join(dirs["backbone"], services.EXPORT_VARIABLES_DIR)),
        ("experts", os.path.join(dirs["experts"], "checkpoints")),
        ("test data", os.path.join(stages["folders"]["mixed"], "val", "lq")),
    ]
    for what, path in needed:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"All-in-one run {os.path.dirname(dirs['router'])!r} is incomplete: the {what} "
                f"stage left no {path!r}. Train it first: python train.py --config "
                "configs/lora_ir_allinone.py --workdir <the same dir> (finished stages are reused)."
            )


def evaluate(config, *, workdir=None, checkpoint=None, datasets=None, out_dir=None) -> str:
    """Re-evaluates a finished all-in-one run from `workdir` without training.

    Stages 2 and 3 are restored from their newest checkpoints and scored on the run's mixed test
    set (`<out_dir>/backbone`, `<out_dir>/experts`); the router is re-scored on the test inputs.
    The table (the one `run` prints) goes to `<out_dir>/allinone.{md,json}`.

    Args:
      config: `configs/lora_ir_allinone.py` with the overrides the run was trained with.
      workdir: the run's workdir.
      checkpoint, datasets: not used by this stage (an error when given).
      out_dir: default `<workdir>/eval`.
    """
    if not workdir or checkpoint or datasets:
        raise ValueError("stage 'lora_ir_allinone' is evaluated from --workdir (and --out_dir)")
    workdir = os.path.abspath(workdir)
    stages = stage_configs(config, workdir)
    _check_complete(stages)
    out_dir = os.path.abspath(out_dir or os.path.join(workdir, "eval"))
    results = {
        name: training.evaluate(
            stages[name], workdir=stages["dirs"][name], out_dir=os.path.join(out_dir, name)
        )
        for name in ("backbone", "experts")
    }
    return _finish(stages, results["backbone"], results["experts"], out_dir)
