"""Training-step, memory and inference benchmarks of the fine-tuning methods, as one table.

    python -m benchmarks.suite                                  # both models, batch 4 of 128x128
    python -m benchmarks.suite --variants nafnet-sidd-w32 --batch 1 --size 64 --steps 3
    python -m benchmarks.suite --json results.json

Per variant and method (full, lora, colora, adaptir; see `benchmarks/common.py`), each in a fresh
process so that its peak memory is its own:

* step: median wall time of the jitted training step (AdamW, PSNR loss, donated state) over
  `--steps` steps after 2 warm-up steps; images/s; compile time (lowering + XLA) separately;
* peak RSS of the process, bytes of the optimizer state and adapter parameters;
* inference (one process per variant): the base model, the model with unmerged LoRA adapters and
  with the adapters merged into the kernels, in `--inference-rounds` shuffled interleaved rounds;
  the ratio is the median of the per-round ratios to the base forward;
* PROD: the sampler alone on the batch, as a share of (sampler + LoRA step).

A row whose worker fails prints the worker's last error line instead. Times depend on the machine
and its load: compare rows of one run.
"""

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import common
from ir_lora import degradations
from ir_lora.peft import lora

VARIANTS = ("nafnet-sidd-w32", "restormer")
INFERENCE_ROUNDS = 21


def _train_row(variant, method, args):
    sample = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    setup = common.make_setup(variant, method, sample, rank=args.rank)
    step, state, frozen = common.make_step(setup)
    batch = common.sample_batch(args.batch, args.size)
    compiled, compile_s = common.compile_seconds(step, state, frozen, batch)
    opt_bytes = common.tree_bytes(state.opt_state)
    trainable_params = sum(x.size for x in jax.tree.leaves(state.trainable))
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return metrics

    seconds = common.median_seconds(run, steps=args.steps)
    return {
        "step_ms": 1e3 * seconds,
        "images_per_s": args.batch / seconds,
        "compile_s": compile_s,
        "peak_rss_mb": common.peak_rss_bytes() / 2**20,
        "opt_state_mb": opt_bytes / 2**20,
        "trainable_params": trainable_params,
        "adapter_params": setup.adapter_params,
    }


def _inference_row(variant, args):
    sample = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    setup = common.make_setup(variant, "lora", sample, rank=args.rank)
    model, params, config = setup.model, setup.params, setup.lora_config
    trainable, frozen = setup.method.init_fn(None)
    factors = trainable["lora"]
    images = common.sample_batch(args.batch, args.size)["lq"]
    merged = jax.jit(lora.merge, static_argnums=2)(params, factors, config)
    forms = {
        "base": (jax.jit(lambda p, x: model.apply({"params": p}, x)), (params, images)),
        "unmerged": (
            jax.jit(lambda p, f, x: lora.apply(model, p, f, config, x)),
            (params, factors, images),
        ),
        "merged": (jax.jit(lambda p, x: model.apply({"params": p}, x)), (merged, images)),
    }
    out = {}
    compiled = {k: common.compile_seconds(fn, *a)[0] for k, (fn, a) in forms.items()}
    # Rounds call every form once, in a shuffled order (no form always runs first or after the
    # same neighbour); a form's ratio is the median over rounds of its time / the base's time in
    # the same round, so load changes between rounds cancel.
    times = {k: [] for k in forms}
    order = list(forms)
    shuffle = random.Random(0).shuffle
    for _ in range(max(args.steps, args.inference_rounds)):
        shuffle(order)
        for k in order:
            fn = functools.partial(compiled[k], *forms[k][1])
            times[k].append(common.median_seconds(fn, steps=1, warmup=1 if not times[k] else 0))
    for k in forms:
        out[f"{k}_ms"] = 1e3 * statistics.median(times[k])
        ratios = [t / b for t, b in zip(times[k], times["base"])]
        out[f"{k}_ratio"] = statistics.median(ratios)
    return out


def _prod_row(variant, args):
    config = degradations.default_config()
    gt = common.sample_batch(args.batch, args.size)["gt"]
    sampler = jax.jit(lambda key, x: degradations.prod(key, x, config))
    compiled, _ = common.compile_seconds(sampler, jax.random.key(0), gt)
    return {
        "prod_ms": 1e3
        * common.median_seconds(lambda: compiled(jax.random.key(1), gt), steps=args.steps)
    }


def _worker(spec, args):
    kind, variant, method = spec
    if kind == "train":
        return _train_row(variant, method, args)
    if kind == "inference":
        return _inference_row(variant, args)
    return _prod_row(variant, args)


def _run_isolated(spec, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    cmd += ["--batch", str(args.batch), "--size", str(args.size)]
    cmd += ["--steps", str(args.steps), "--rank", str(args.rank)]
    cmd += ["--inference-rounds", str(args.inference_rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"skipped": f"worker failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def print_tables(results, args):
    print(
        f"\n{jax.devices()[0].device_kind}, batch {args.batch} of {args.size}x{args.size}, "
        f"median of {args.steps} steps, LoRA rank {args.rank}\n"
    )
    print(
        "| model | method | step ms | images/s | compile s | peak RSS MiB | "
        "optimizer state MiB | trainable params |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for variant, rows in results.items():
        for method in (m for m in common.METHODS if m in rows):
            r = rows[method]
            if "skipped" in r:
                print(f"| {variant} | {method} | skipped: {r['skipped']} ||||||")
                continue
            print(
                f"| {variant} | {method} | {_fmt(r['step_ms'])} | {_fmt(r['images_per_s'], 2)} | "
                f"{_fmt(r['compile_s'], 1)} | {_fmt(r['peak_rss_mb'])} | "
                f"{_fmt(r['opt_state_mb'], 2)} | {_fmt(r['trainable_params'])} |"
            )
    print(
        "\n| model | base forward ms | unmerged LoRA ms (ratio) | merged LoRA ms (ratio) | "
        "PROD sampler ms (share of LoRA step) |"
    )
    print("|---|---:|---:|---:|---:|")
    for variant, rows in results.items():
        if "inference" not in rows:
            continue
        inf, prod = rows["inference"], rows.get("prod", {})
        if "skipped" in inf:
            print(f"| {variant} | skipped: {inf['skipped']} ||||")
            continue
        base = inf["base_ms"]
        if "prod_ms" in prod and "step_ms" in rows.get("lora", {}):
            share = prod["prod_ms"] / (prod["prod_ms"] + rows["lora"]["step_ms"])
            prod_text = f"{_fmt(prod['prod_ms'])} ({100 * share:.1f}%)"
        else:
            prod_text = f"skipped: {prod.get('skipped', 'no LoRA step')}"
        print(
            f"| {variant} | {_fmt(base)} | {_fmt(inf['unmerged_ms'])} "
            f"({inf['unmerged_ratio']:.3f}) | {_fmt(inf['merged_ms'])} "
            f"({inf['merged_ratio']:.3f}) | {prod_text} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument(
        "--methods", nargs="*", default=list(common.METHODS), help="training rows (none: skip)"
    )
    parser.add_argument(
        "--inference-rounds", type=int, default=INFERENCE_ROUNDS, help="at least --steps"
    )
    parser.add_argument("--no-inference", action="store_true", help="skip inference and PROD rows")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker), args)))
        return
    results = {}
    for variant in args.variants:
        rows = results.setdefault(variant, {})
        for method in args.methods:
            rows[method] = _run_isolated(("train", variant, method), args)
            print(variant, method, rows[method], flush=True)
        if not args.no_inference:
            rows["inference"] = _run_isolated(("inference", variant, None), args)
            rows["prod"] = _run_isolated(("prod", variant, None), args)
            print(variant, "inference", rows["inference"], rows["prod"], flush=True)
    print_tables(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
