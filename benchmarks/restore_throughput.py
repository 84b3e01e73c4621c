"""Images/s of the restore command's model path on 1-megapixel photographs, whole and tiled.

  flock /tmp/ir_lora_big.lock python -m benchmarks.restore_throughput --models nafnet-sidd-w32
  flock /tmp/ir_lora_big.lock python -m benchmarks.restore_throughput --models restormer --rounds 2

For each backbone (random weights: speed does not depend on their values) two models, the base
and the base with LoRA (rank 4 on every conv, random non-zero factors) merged into it, each
restoring the bundled photographs resized to 1000 x 1000 through `ir_lora.Restorer.restore`
(what `ir-lora-restore` runs per image, without decoding and PNG encoding): whole images, and
tiles of `--tile` overlapping by `--tile_overlap` in batches of `--batch_size` (Restormer's
`demo.py` example: 720 and 32). Before timing, XLA's accounting of each program says how much
memory it needs. Rounds time every row once, in a shuffled order; a row's images/s is the median
over rounds, and "merged / base" is the median of the per-round ratios of the two.
"""

import argparse
import json
import random
import statistics
import time

import jax
import numpy as np
from PIL import Image

from benchmarks import common
from ir_lora import models
from ir_lora.data import samples
from ir_lora.peft import lora
from ir_lora.restore import Restorer, memory
from ir_lora.restore import restorer as restorer_lib

SIDE = 1000


def photographs(count: int) -> list[np.ndarray]:
    """The bundled photographs, resized (bicubic) to SIDE x SIDE, as float32 in [0, 1]."""
    photos = [pixels for _, pixels in samples.sample_photos()][:count]
    resized = [Image.fromarray(p).resize((SIDE, SIDE), Image.Resampling.BICUBIC) for p in photos]
    return [np.asarray(p, np.float32) / 255.0 for p in resized]


def merged_lora(variant: str, params, rank: int):
    """`params` with random rank-`rank` LoRA factors on every conv folded in."""
    model = models.build(variant)
    config = lora.LoraConfig(targets=((r"(.*/)?norm[^/]*", 0), (".*", rank)))
    sample = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda x: lora.init_lora(model, config, jax.random.key(0), x), sample)
    factors = common.random_params({"lora": shapes}, seed=1)["lora"]
    return lora.merge(params, factors, config)


def _needs(restorer: Restorer, shape) -> str:
    need = restorer._compile(shape)
    return "n/a" if need is None else memory.gib(need)


def benchmark(variant: str, args) -> list[dict]:
    params = common.random_params(models.param_shapes(variant))
    options = dict(
        model_multiple=restorer_lib.network_multiple(variant),
        reflect_multiple=restorer_lib.official_reflect_multiple(variant),
        tile_overlap=args.tile_overlap,
        batch_size=args.batch_size,
    )
    forward = restorer_lib.architecture_forward(variant)
    restorers = {
        "base": Restorer(forward, params, name="base", **options),
        "LoRA merged": Restorer(forward, merged_lora(variant, params, args.rank), **options),
    }
    images = photographs(args.images)
    base = restorers["base"]
    whole_shape = (1, *base.bucket(SIDE, SIDE), 3)
    tile_shape = (args.batch_size, args.tile, args.tile, 3)
    print(
        f"{variant}: whole {whole_shape[1]}x{whole_shape[2]} needs {_needs(base, whole_shape)}, "
        f"a batch of {args.batch_size} tiles of {args.tile} needs {_needs(base, tile_shape)} "
        f"(XLA); {memory.gib(memory.free_bytes(jax.devices()[0])[0])} free",
        flush=True,
    )
    # "whole" is what the command does without --tile: whole if XLA says it fits, else tiles.
    plan = base.plan((SIDE, SIDE), args.tile_overlap, args.batch_size)
    whole = "whole" if plan.tile is None else f"whole -> auto tiles {plan.tile}"
    modes = {whole: plan.tile, f"tiles {args.tile}/{args.tile_overlap}": args.tile}
    rows = [(m, t, mode) for m in restorers for mode, t in modes.items()]
    for model, tile, _ in rows:  # compile and warm up every program
        restorers[model].restore(images[0], tile=tile)
    seconds = {row: [] for row in rows}
    order = list(rows)
    for _ in range(args.rounds):
        random.Random(len(seconds[rows[0]])).shuffle(order)
        for row in order:
            model, tile, _ = row
            start = time.perf_counter()
            for image in images:
                restorers[model].restore(image, tile=tile)
            seconds[row].append((time.perf_counter() - start) / len(images))
    out = []
    for model, tile, mode in rows:
        base_times = seconds[("base", tile, mode)]
        ratios = [t / b for t, b in zip(seconds[(model, tile, mode)], base_times)]
        out.append(
            {
                "model": variant,
                "weights": model,
                "mode": mode,
                "images_per_s": 1.0 / statistics.median(seconds[(model, tile, mode)]),
                "ratio_to_base": statistics.median(ratios),
                "seconds_per_image": seconds[(model, tile, mode)],
            }
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nafnet-sidd-w32", "restormer"])
    parser.add_argument("--images", type=int, default=2, help="photographs per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tile", type=int, default=720)
    parser.add_argument("--tile_overlap", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [row for variant in args.models for row in benchmark(variant, args)]
    print(f"\n{SIDE}x{SIDE} photographs, {args.images} per row and round, {args.rounds} rounds")
    print("| model | weights | mode | images/s | / base |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['weights']} | {r['mode']} | {r['images_per_s']:.3f} | "
            f"{r['ratio_to_base']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
