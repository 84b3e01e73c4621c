"""Evaluate a restore function on test sets: BasicSR's PSNR/SSIM, tables, images, comparisons.

```python
from ir_lora import evaluator
from ir_lora.data import pipeline

results = evaluator.evaluate(
    model.apply,  # called as model.apply(variables, x): (N, H, W, 3) -> (N, H, W, 3)
    {"sidd": sidd_val, "cbsd68_25": pipeline.eval_dataset(cbsd68, noise_sigma=25)},
    params={"params": params},
    out_dir="runs/x/eval",
    save_comparisons=True,
)
print(evaluator.format_table(results))
```

Every image is restored whole (or in tiles, see `ir_lora.inference`), then measured exactly as
BasicSR's validation does (`ir_lora.metrics`): the float output is clamped and rounded to uint8,
`crop_border` pixels are removed, optionally only the BT.601 luma is kept, and a dataset's score
is the mean of its per-image scores. The degraded input is measured against the target the same
way ("input PSNR/SSIM"), the baseline a restoration has to beat.

With `out_dir`, the tables `results.md`, `results.json` and `results.csv` are rewritten after each
dataset, each atomically (a temporary file renamed over the old one), and list only the datasets
already finished; until the last one is, they say how many are still pending (`"complete": false`
in the JSON), so an interrupted run never leaves a table whose means look final.
"""

import csv
import functools
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ir_lora import inference, metrics
from ir_lora.data import pipeline

METRICS = ("psnr", "ssim", "input_psnr", "input_ssim")
CSV_FIELDS = ("row", "dataset", "image", "height", "width", *METRICS)
COMPARISONS_DIR = "comparisons"
# Comparison grids: a label band above the three panels, and a white gap between them.
HEADER_HEIGHT = 16
PANEL_GAP = 4

_log = logging.getLogger(__name__)


def _examples(name: str, dataset):
    """`eval_dataset` examples of a dataset given as a source or as an `eval_dataset` already."""
    if not isinstance(dataset, grain.MapDataset):
        dataset = pipeline.eval_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name!r} is empty.")
    return dataset


def _check_example(dataset: str, example) -> None:
    if "lq" not in example:
        raise ValueError(
            f"Dataset {dataset!r}, image {example.get('name')!r}: no degraded 'lq' image (a clean "
            "dataset); pass pipeline.eval_dataset(source, noise_sigma=...) to make one."
        )
    lq, gt = example["lq"], example["gt"]
    if lq.ndim != 4 or lq.shape[0] != 1 or lq.shape != gt.shape:
        raise ValueError(
            f"Dataset {dataset!r}, image {example.get('name')!r}: expected 'lq' and 'gt' of one "
            f"shape (1, H, W, C), got {lq.shape} and {gt.shape}."
        )


def _image_path(out_dir: str, *parts: str) -> str:
    path = os.path.normpath(os.path.join(out_dir, *parts) + ".png")
    if os.path.relpath(path, out_dir).startswith(os.pardir):
        raise ValueError(f"Image name {parts[-1]!r} would be written outside {out_dir!r}.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def comparison_grid(lq, restored, gt, *, labels: tuple[str, str, str]) -> np.ndarray:
    """Degraded | restored | target side by side under a band of labels, as uint8 RGB.

    Args:
      lq, restored, gt: `(H, W, 3)` images, uint8 or float in [0, 1].
      labels: the text above each panel.

    Returns:
      `(HEADER_HEIGHT + H, 3 * W + 2 * PANEL_GAP, 3)` uint8.
    """
    panels = [metrics.to_uint8(x) for x in (lq, restored, gt)]
    h, w = panels[0].shape[:2]
    grid = np.full((HEADER_HEIGHT + h, 3 * w + 2 * PANEL_GAP, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        grid[HEADER_HEIGHT:, i * (w + PANEL_GAP) : i * (w + PANEL_GAP) + w] = panel
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, label in enumerate(labels):
        draw.text((i * (w + PANEL_GAP) + 2, 2), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _save_png(path: str, img: np.ndarray) -> None:
    Image.fromarray(img).save(path)


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRICS}


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def format_table(results: Mapping) -> str:
    """The markdown table of per-dataset means (one row per finished dataset).

    Args:
      results: what `evaluate` returns (or `results.json` read back).

    Returns:
      The table, with a last row of the mean over datasets when there are several, or, when
      the evaluation is incomplete, a line naming the pending datasets instead.
    """
    lines = [
        "| dataset | images | PSNR | SSIM | input PSNR | input SSIM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    means = []
    for name, entry in results["datasets"].items():
        mean = entry["mean"]
        means.append(mean)
        cells = [_fmt(mean[k], 2 if "psnr" in k else 4) for k in METRICS]
        lines.append(f"| {name} | {entry['num_images']} | " + " | ".join(cells) + " |")
    complete = results.get("complete", True)
    # A mean over datasets is only a claim about the whole evaluation once it is complete.
    if len(means) > 1 and complete:
        cells = [
            _fmt(float(np.mean([m[k] for m in means])), 2 if "psnr" in k else 4) for k in METRICS
        ]
        lines.append(f"| mean of {len(means)} datasets | | " + " | ".join(cells) + " |")
    if not complete:
        pending = ", ".join(results.get("pending", []))
        lines.append("")
        lines.append(
            f"**Incomplete**: {len(results['datasets'])} datasets done; pending: {pending}."
        )
    return "\n".join(lines)


def _settings_line(settings: Mapping) -> str:
    channel = "Y channel (BT.601)" if settings["test_y_channel"] else "RGB"
    tiling = (
        "whole images"
        if settings["tile"] is None
        else f"tiles of {settings['tile']} overlapping by {settings['tile_overlap']} "
        f"({settings['tile_blend']} blend)"
    )
    return (
        f"PSNR (dB) / SSIM as BasicSR, on {channel}, crop_border={settings['crop_border']}; "
        f"{tiling}, reflect-padded to a multiple of {settings['pad_multiple']}. "
        "'input' measures the degraded image against the target."
    )


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_text(results: Mapping) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for dataset, entry in results["datasets"].items():
        for row in entry["images"]:
            writer.writerow({"row": "image", "dataset": dataset, "image": row["name"], **row})
        writer.writerow({"row": "mean", "dataset": dataset, "image": "", **entry["mean"]})
    return out.getvalue()


def write_results(results: Mapping, out_dir: str) -> None:
    """Writes `results.md`, `results.json` and `results.csv` to `out_dir`, each atomically.

    The CSV has one row per image (`row=image`) and one per dataset mean (`row=mean`), with the
    columns `CSV_FIELDS`; infinite PSNRs (identical images) are written as `inf` (in the JSON as
    `Infinity`, which Python's `json` reads back).
    """
    os.makedirs(out_dir, exist_ok=True)
    markdown = "\n\n".join(
        ["# Evaluation", format_table(results), _settings_line(results["settings"])]
    )
    _atomic_write(os.path.join(out_dir, "results.md"), markdown + "\n")
    _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    _atomic_write(os.path.join(out_dir, "results.csv"), _csv_text(results))


def _restore_and_score(restore, example, *, crop_border: int, test_y_channel: bool):
    """The restored image, and its row of the results."""
    lq, gt = example["lq"][0], example["gt"][0]
    restored = restore(lq)
    opts = {"crop_border": crop_border, "test_y_channel": test_y_channel}
    return restored, {
        "name": example["name"],
        "height": int(gt.shape[0]),
        "width": int(gt.shape[1]),
        "psnr": metrics.psnr(restored, gt, **opts),
        "ssim": metrics.ssim(restored, gt, **opts),
        "input_psnr": metrics.psnr(lq, gt, **opts),
        "input_ssim": metrics.ssim(lq, gt, **opts),
    }


def _evaluate_dataset(
    restore, name, examples, *, crop_border, test_y_channel, out_dir, save_images, save_comparisons
) -> dict:
    rows = []
    start = time.perf_counter()
    for example in examples:
        _check_example(name, example)
        try:
            restored, row = _restore_and_score(
                restore, example, crop_border=crop_border, test_y_channel=test_y_channel
            )
        except ValueError as e:
            raise ValueError(f"Dataset {name!r}, image {example['name']!r}: {e}") from e
        rows.append(row)
        if save_images:
            _save_png(_image_path(out_dir, name, row["name"]), metrics.to_uint8(restored))
        if save_comparisons:
            labels = (
                f"degraded {_fmt(row['input_psnr'], 2)} dB",
                f"restored {_fmt(row['psnr'], 2)} dB",
                "target",
            )
            lq, gt = example["lq"][0], example["gt"][0]
            grid = comparison_grid(lq, restored, gt, labels=labels)
            _save_png(_image_path(out_dir, COMPARISONS_DIR, name, row["name"]), grid)
    return {
        "num_images": len(rows),
        "mean": _mean(rows),
        "seconds": time.perf_counter() - start,
        "images": rows,
    }


def evaluate(
    restore_fn: Callable,
    datasets: Mapping[str, object],
    *,
    params=None,
    crop_border: int = 0,
    test_y_channel: bool = False,
    tile: int | None = None,
    tile_overlap: int = 32,
    tile_blend: str = "average",
    tile_batch_size: int = 4,
    pad_multiple: int = 16,
    out_dir: str | None = None,
    save_images: bool = False,
    save_comparisons: bool = False,
) -> dict:
    """Restores every image of every dataset and measures PSNR/SSIM of output and input.

    Args:
      restore_fn: pure function from an `(N, H, W, C)` float32 batch in [0, 1] to the restored
        batch of the same shape, called as `restore_fn(x)`, or as `restore_fn(params, x)` when
        `params` is given. It is jitted here (each padded shape compiles once).
      params: a pytree (e.g. `{"params": p}` for `model.apply`) passed to `restore_fn` as a jit
        argument. Prefer it to closing over the weights: a closure bakes them into every
        compiled program as constants (slow to compile and large for a 26M-weight Restormer).
      datasets: name -> a data source of raw examples (`data.prepare(...)`/`data.load(...)`, or
        any sequence of dicts with uint8 `"lq"`, `"gt"` and a `"name"`), or the
        `pipeline.eval_dataset(...)` of one (needed for clean sets with `noise_sigma`).
      crop_border: pixels removed from each edge before measuring (BasicSR `crop_border`).
      test_y_channel: measure on the BT.601 luma (BasicSR `test_y_channel`).
      tile: tile side for large images (None: always whole images); see `ir_lora.inference`.
      tile_overlap: minimum overlap between tiles.
      tile_blend: "average" (as the official test scripts) or "trim".
      tile_batch_size: tiles per call of `restore_fn`.
      pad_multiple: reflect-pad H and W to a multiple of this; larger values bucket varied image
        sizes into fewer compiled shapes.
      out_dir: where to write `results.{md,json,csv}` (after each dataset) and images.
      save_images: write each restored image as `out_dir/<dataset>/<name>.png`.
      save_comparisons: write degraded | restored | target grids as
        `out_dir/comparisons/<dataset>/<name>.png`.

    Returns:
      `{"settings": {...}, "complete": True, "pending": [], "datasets": {name: {"num_images",
      "mean": {"psnr", "ssim", "input_psnr", "input_ssim"}, "seconds", "images": [{"name",
      "height", "width", "psnr", "ssim", "input_psnr", "input_ssim"}, ...]}}}`.

    Raises:
      ValueError: for a bad setting, an empty or clean dataset, or an image too small for the
        metrics; the message names the dataset and image.
    """
    if (save_images or save_comparisons) and out_dir is None:
        raise ValueError("save_images / save_comparisons need an out_dir.")
    if COMPARISONS_DIR in datasets and (save_images or save_comparisons):
        raise ValueError(f"A dataset may not be named {COMPARISONS_DIR!r} when saving images.")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}.")
    inference.check_settings(
        tile=tile,
        tile_overlap=tile_overlap,
        pad_multiple=pad_multiple,
        tile_batch_size=tile_batch_size,
        tile_blend=tile_blend,
    )
    settings = {
        "crop_border": crop_border,
        "test_y_channel": test_y_channel,
        "tile": tile,
        "tile_overlap": tile_overlap,
        "tile_blend": tile_blend,
        "pad_multiple": pad_multiple,
    }
    jitted = jax.jit(restore_fn)
    if params is not None:
        jitted = functools.partial(jitted, jax.device_put(params))

    def restore(lq):
        return inference.restore_image(
            jitted,
            lq,
            tile=tile,
            tile_overlap=tile_overlap,
            pad_multiple=pad_multiple,
            tile_batch_size=tile_batch_size,
            tile_blend=tile_blend,
        )

    # Opening every dataset first reports a bad one before hours of work on the others.
    sources = {name: _examples(name, ds) for name, ds in datasets.items()}
    results = {"settings": settings, "complete": False, "pending": list(sources), "datasets": {}}
    if out_dir is not None:
        write_results(results, out_dir)  # replaces the tables of any earlier run at once
    for name, examples in sources.items():
        results["datasets"][name] = _evaluate_dataset(
            restore,
            name,
            examples,
            crop_border=crop_border,
            test_y_channel=test_y_channel,
            out_dir=out_dir,
            save_images=save_images,
            save_comparisons=save_comparisons,
        )
        results["pending"].remove(name)
        results["complete"] = not results["pending"]
        mean = results["datasets"][name]["mean"]
        _log.info("%s: PSNR %.2f dB, SSIM %.4f", name, mean["psnr"], mean["ssim"])
        if out_dir is not None:
            write_results(results, out_dir)
    return results
