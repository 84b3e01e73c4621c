"""Input pipeline: random-crop throughput by storage form and worker count, and data-wait of a run.

    python -m benchmarks.input_pipeline --json benchmarks/results/input_pipeline.json
    python -m benchmarks.input_pipeline --photos 8 --no-training      # a quick look

Nothing is downloaded. The photographs are made from scikit-image's sample photographs
(`write_large_photos`): each is a mosaic of the samples, every one enlarged by a random factor in
[1, 2] (Pillow bicubic) and laid row by row on a 2040x1356 canvas (DIV2K's size, 2.77 MP), with
Gaussian grain of sigma 2 (0..255) added so that the PNGs compress like real photographs (about
4 MB each; DIV2K's are 2-6 MB). They are written once to `--workdir`.

Storage forms, each prepared from the same folder with `ir_lora.data.prepare`:

* `whole PNG`: every image one record of its PNG bytes (the form before tiles; evaluation splits
  still use it), decoded whole for every crop;
* `BasicSR sub-images`: BasicSR's `extract_subimages.py` first (480x480 windows, step 240, border
  windows kept, PNG compression 3), then the sub-image folder prepared whole;
* `tiles T`: the training-split form, raw uint8 tiles of T x T (T = 128 is the default).

Throughput: `pipeline.train_dataset` with `--gt-size` crops, batch `--batch`, BasicSR flips,
`worker_count` 0 and `--workers`; the first batch (worker start-up) is not timed, then batches
are taken for at least `--seconds`. Rows run in `--rounds` rounds; the table gives the median.

Training: `ir_lora.stages.registry.train` (what `train.py` runs) of the quickstart's pre-training
(`configs/quickstart.py`: small NAFNet, PROD, batch 8 of 64x64 crops) on the large photographs,
`--train-steps` steps, per storage form. The data-wait fraction is what the trainer logs (time
blocked on the input / wall time), averaged over the logs after the first (which holds the
compilation).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import struct
import time

import numpy as np
from PIL import Image

from ir_lora import data
from ir_lora.data import pipeline, samples

CANVAS = (1356, 2040)  # DIV2K's usual height x width
SUBIMAGE, SUBIMAGE_STEP = 480, 240  # BasicSR's extract_subimages.py for DIV2K HR


def large_photo(photos, rng: np.random.Generator, size=CANVAS, grain=2.0) -> np.ndarray:
    """One mosaic photograph (module doc): enlarged samples laid row by row, plus grain."""
    h, w = size
    canvas = np.zeros((h, w, 3), np.uint8)
    top = 0
    while top < h:
        left, row_height = 0, h - top
        while left < w:
            _, pixels = photos[rng.integers(len(photos))]
            img = Image.fromarray(pixels)
            scale = rng.uniform(1.0, 2.0)
            img = img.resize(
                (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
            )
            tile = np.asarray(img)[: h - top, : w - left]
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
            left += tile.shape[1]
            row_height = min(row_height, tile.shape[0])
        top += row_height
    noisy = canvas + rng.normal(0.0, grain, canvas.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def write_large_photos(folder: str, count: int, *, size=CANVAS, seed: int = 0) -> str:
    """`count` PNG mosaics (`large_photo`) in `folder`, kept if already there."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"photo{i:03d}.png") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return folder
    photos = samples.sample_photos()
    rng = np.random.default_rng(seed)
    for path in paths:
        Image.fromarray(large_photo(photos, rng, size)).save(path)
    return folder


def subimage_origins(length: int, crop: int = SUBIMAGE, step: int = SUBIMAGE_STEP) -> list[int]:
    """BasicSR's window starts along one axis: every `step`, plus the border window."""
    starts = list(range(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > 0:
        starts.append(length - crop)
    return starts


def extract_subimages(source: str, folder: str) -> str:
    """BasicSR's `extract_subimages.py` (crop 480, step 240, thresh 0, PNG compression 3)."""
    os.makedirs(folder, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(source, "*.png"))):
        pixels = np.asarray(Image.open(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        index = 0
        for top in subimage_origins(pixels.shape[0]):
            for left in subimage_origins(pixels.shape[1]):
                index += 1
                out = os.path.join(folder, f"{stem}_s{index:03d}.png")
                if not os.path.exists(out):
                    window = pixels[top : top + SUBIMAGE, left : left + SUBIMAGE]
                    Image.fromarray(np.ascontiguousarray(window)).save(out, compress_level=3)
    return folder


def _folder_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def prepare_forms(work: str, photos: str, tile_sizes) -> dict[str, dict]:
    """`{form: {"dataset", "source_dir", "data_dir", "prepare_s", "mb"}}`, each prepared once."""
    forms = {"whole PNG": (data.CleanConfig(name="bench_whole", splits={"train": ""},
                                            tiled_splits=()), photos)}  # fmt: skip
    subimages = extract_subimages(photos, os.path.join(work, "subimages"))
    forms["BasicSR sub-images"] = (
        data.CleanConfig(name="bench_subimages", splits={"train": ""}, tiled_splits=()),
        subimages,
    )
    for t in tile_sizes:
        name = "images" if t == 128 else f"bench_tiles{t}"
        config = name if t == 128 else data.CleanConfig(
            name=name, splits={"train": ""}, tile_size=t
        )  # fmt: skip
        forms[f"tiles {t}"] = (config, photos)
    out = {}
    for form, (dataset, source) in forms.items():
        data_dir = os.path.join(work, "tfds", form.replace(" ", "_"))
        start = time.perf_counter()
        split = data.prepare(dataset, source_dir=source, data_dir=data_dir)
        seconds = time.perf_counter() - start
        out[form] = {
            "dataset": dataset,
            "source_dir": source,
            "data_dir": data_dir,
            "split": split,
            "prepare_s": seconds,
            "mb": _folder_mb(data_dir),
            "images": len(split),
        }
    return out


def crops_per_second(split, *, workers: int, batch: int, gt_size: int, seconds: float) -> float:
    dataset = pipeline.train_dataset(
        split,
        gt_size=gt_size,
        global_batch_size=batch,
        seed=0,
        worker_count=workers,
        process_index=0,
        process_count=1,
    )
    iterator = iter(dataset)
    try:
        for _ in range(1 + workers):  # start-up, and what the workers buffered meanwhile
            next(iterator)
        start, taken = time.perf_counter(), 0
        while taken < 3 or time.perf_counter() - start < seconds:
            next(iterator)
            taken += 1
        return taken * batch / (time.perf_counter() - start)
    finally:
        iterator.close()


def _read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """Scalars of TensorBoard event files (TFRecord framing; CRCs not checked)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(raw[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                number = value.simple_value
                if value.HasField("tensor") and value.tensor.float_val:
                    number = value.tensor.float_val[0]
                out.setdefault(value.tag, {})[event.step] = float(number)
    return out


def training_row(form: dict, work: str, *, steps: int, workers: int) -> dict:
    """The quickstart pre-training on the large photographs, as train.py runs it."""
    from configs import quickstart
    from ir_lora.stages import registry

    config = quickstart.get_config().pretrain.copy_and_resolve_references()
    config.unlock()
    del config.data["dataset"]  # a custom configuration object, not a name
    config.data.dataset = form["dataset"]
    config.data.source_dir = form["source_dir"]
    config.data.data_dir = form["data_dir"]
    config.data.worker_count = workers
    config.num_train_steps = steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 3)
    config.log_every_steps = max(1, steps // 6)
    config.checkpoint_every_steps = steps
    config.export = False
    workdir = os.path.join(work, "runs", f"{form['name']}_{workers}".replace(" ", "_"))
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    registry.train(config, workdir)
    wall = time.perf_counter() - start
    scalars = _read_scalars(workdir)
    waits = scalars["data_wait_fraction"]
    later = [v for s, v in sorted(waits.items())[1:]]
    rates = [v for s, v in sorted(scalars.get("steps_per_sec", {}).items())[1:]]
    return {
        "form": form["name"],
        "workers": workers,
        "steps": steps,
        "batch": int(config.data.batch_size),
        "gt_size": int(config.data.gt_size),
        "data_wait_fraction": statistics.mean(later),
        "data_wait_by_log": {int(s): v for s, v in waits.items()},
        "step_ms": 1000.0 / statistics.median(rates) if rates else None,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/ir_lora_input_pipeline")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--gt-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiles", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    photos = write_large_photos(os.path.join(args.workdir, "photos"), args.photos)
    megapixels = CANVAS[0] * CANVAS[1] / 1e6
    png_mb = _folder_mb(photos) / args.photos
    print(f"{args.photos} photographs of {CANVAS[1]}x{CANVAS[0]} ({megapixels:.2f} MP), "
          f"{png_mb:.1f} MB PNG each, in {photos}")  # fmt: skip
    forms = prepare_forms(args.workdir, photos, args.tiles)
    for name, form in forms.items():
        form["name"] = name

    rows = [(name, w) for name in forms for w in (0, args.workers)]
    rates: dict[tuple[str, int], list[float]] = {row: [] for row in rows}
    for round_index in range(args.rounds):
        for name, workers in rows if round_index % 2 == 0 else reversed(rows):
            rate = crops_per_second(
                forms[name]["split"],
                workers=workers,
                batch=args.batch,
                gt_size=args.gt_size,
                seconds=args.seconds,
            )
            rates[(name, workers)].append(rate)
            print(f"  round {round_index + 1}: {name}, {workers} workers: {rate:.0f} crops/s")

    print(f"\nRandom {args.gt_size}x{args.gt_size} crops, batch {args.batch}, flips on; "
          f"median of {args.rounds} rounds.\n")  # fmt: skip
    print(f"| storage | images | MB on disk | prepare s | crops/s, 0 workers | "
          f"crops/s, {args.workers} workers |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    table = []
    for name, form in forms.items():
        zero = statistics.median(rates[(name, 0)])
        many = statistics.median(rates[(name, args.workers)])
        print(f"| {name} | {form['images']} | {form['mb']:,.0f} | {form['prepare_s']:.0f} | "
              f"{zero:,.0f} | {many:,.0f} |")  # fmt: skip
        row = {k: v for k, v in form.items() if k not in ("dataset", "split")}
        row["crops_per_s"] = {"0": zero, str(args.workers): many}
        row["rounds"] = {str(w): rates[(name, w)] for w in (0, args.workers)}
        table.append(row)

    training = []
    if not args.no_training:
        for name in ("tiles 128", "whole PNG"):
            if name in forms:
                training.append(
                    training_row(forms[name], args.workdir, steps=args.train_steps, workers=0)
                )
        print(f"\nQuickstart pre-training (small NAFNet, PROD, batch {training[0]['batch']} of "
              f"{training[0]['gt_size']}x{training[0]['gt_size']}) on the photographs, "
              f"{args.train_steps} steps, 0 workers:\n")  # fmt: skip
        print("| storage | step ms | data-wait fraction |")
        print("|---|---:|---:|")
        for row in training:
            print(f"| {row['form']} | {row['step_ms']:,.0f} | {row['data_wait_fraction']:.1%} |")

    if args.json:
        result = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg(),
            "args": vars(args),
            "photos": {"count": args.photos, "size": list(CANVAS), "png_mb_each": png_mb},
            "storage": table,
            "training": training,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
