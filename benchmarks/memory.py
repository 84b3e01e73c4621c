"""Memory of one training step as XLA accounts for it, and the largest batch that fits a budget.

    python -m benchmarks.memory                                # the whole table (slow: compiles)
    python -m benchmarks.memory --variants nafnet-sidd-w32 --methods full lora --remat none
    python -m benchmarks.memory --dtypes float32 bfloat16 --time-steps 3 --json memory.json
    python -m benchmarks.memory --table memory.json more.json  # one table of saved runs

The step is the one `train.py` runs (`train_lib.train_step`: AdamW, L1 loss, frozen and trainable
trees, donated state), with the method built by the method registry from the configs' defaults:

* `full`: every parameter trains;
* `lora`: the `lora` section's default, which is the README's API-tour `LoraConfig` (rank 4 on
  every conv, depthwise included; norms excluded), biases and norms trained;
* `lora_dense`: rank 4 on the dense convs only, depthwise frozen (peft's form, which cannot adapt
  depthwise convs; the LoRA rows of `compare_torch.py`), biases and norms trained;
* `colora`: CoLoRA's per-layer ranks (`benchmarks/common.py: colora_ranks`, about the adapter
  size of rank 4 on the dense convs);
* `adaptir`: AdaptIR beside every block's feed-forward path, backbone frozen.

`remat` and `dtype` are the model's fields (`--config.model.overrides.remat=blocks`). Each row is
compiled (`jax.jit(step).lower(...).compile()`) and `memory_analysis()` read: temporaries,
arguments, outputs and the argument bytes the donated state aliases into the outputs; the
footprint is `arguments + outputs - aliased + temporaries`. Every activation scales with the
number of pixels in the batch, so the footprint is linear in `batch * height * width`; two
compiles (batch 1 and `--batch`) fit it, and the largest batch of each `--fit-sizes` crop that
fits each of `--budgets` GiB follows; `--verify` compiles that batch (and one more) to check the
prediction. `--time-steps N` also times N steps at `--batch` (on this CPU, a second or minutes
per step). Each row runs in a fresh process (`--in-process` to not), so one row's allocator
cache does not count against the next. Weights are random (`common.random_params`); memory does
not depend on them.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from configs import common as configs_common
from ir_lora import losses, methods, train_lib
from ir_lora.models import build
from ir_lora.peft import intercept, lora

VARIANTS = ("nafnet-sidd-w32", "restormer")
METHODS = ("full", "lora", "lora_dense", "colora", "adaptir")
# Rows built as the `lora` method with explicit per-layer ranks of the dense convs.
DENSE_RANKS = {
    "lora_dense": lambda layers: dict.fromkeys(layers, 4),
    "colora": lambda layers: common.colora_ranks(layers, rank=4),
}
REMATS = ("none", "blocks")
DTYPES = ("float32", "bfloat16")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
    variant: str
    method: str
    remat: str
    dtype: str


def _config(row: Row, model, sample):
    config = configs_common.training_config(
        "finetune", "lora" if row.method in DENSE_RANKS else row.method, row.variant
    )
    config.loss = "l1"
    if row.method in DENSE_RANKS:
        ranks = DENSE_RANKS[row.method](common.conv_layers(model, sample))
        config.lora.targets = lora.targets_from_ranks(ranks)
    return config


def overrides(row: Row) -> dict:
    """The model overrides of `row`: nothing for the defaults, so rows match a plain build."""
    out = {}
    if row.remat != "none":
        out["remat"] = row.remat
    if row.dtype != "float32":
        out["dtype"] = row.dtype
    return out


def build_step(row: Row, batch: int, size: int):
    """`(jitted step, args)` of `row`'s training step on `batch` crops of `size` x `size`."""
    model = build(row.variant, **overrides(row))
    sample = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    config = _config(row, model, sample)
    adaptation = methods.build(config, model, image_shape=sample.shape)
    backbone = common.random_params(intercept.eval_shape_init(model, sample)["params"])
    trainable, frozen = jax.jit(adaptation.method.init_fn)(jax.random.key(0), backbone)
    tx = train_lib.make_optimizer(config.optimizer, num_train_steps=1000)
    state = train_lib.initial_state(trainable, tx, 0)
    step = jax.jit(
        lambda state, frozen, batch: train_lib.train_step(
            state,
            frozen,
            batch,
            apply_fn=adaptation.method.apply_fn,
            objective=train_lib.restoration_objective(losses.get(config.loss)),
            tx=tx,
        ),
        donate_argnums=(0,),
    )
    return step, (state, frozen, common.sample_batch(batch, size))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def analyse(row: Row, batch: int, size: int, time_steps: int = 0) -> dict:
    """XLA's memory accounting of `row`'s step (bytes), its compile seconds and, with
    `time_steps`, the median seconds of that many steps of the same compiled program (after
    one warm-up step)."""
    step, (state, frozen, images) = build_step(row, batch, size)
    start = time.perf_counter()
    compiled = step.lower(*_abstract((state, frozen, images))).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    out = {
        "temp": stats.temp_size_in_bytes,
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "compile_s": seconds,
    }
    out["footprint"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    if time_steps:
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], frozen, images)
            return metrics

        out["step_s"] = common.median_seconds(run, steps=time_steps, warmup=1)
    return out


def largest_batches(small: dict, large: dict, batch: int, size: int, sizes, budgets) -> dict:
    """`{crop size: {budget GiB: largest batch}}` from the footprint's linear fit in pixels.

    `small` is the accounting at batch 1, `large` at `batch` (both of `size` x `size`).
    """
    per_pixel = (large["footprint"] - small["footprint"]) / ((batch - 1) * size * size)
    fixed = small["footprint"] - per_pixel * size * size
    out = {}
    for crop in sizes:
        out[crop] = {}
        for budget in budgets:
            fit = math.floor((budget * GIB - fixed) / (per_pixel * crop * crop))
            out[crop][budget] = max(fit, 0)
    return out


def _gib(value) -> str:
    return f"{value / GIB:.2f}"


def print_table(results, args):
    print(
        f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, one training step (AdamW, L1), "
        f"batch {args.batch} of {args.size}x{args.size}; GiB from XLA's memory_analysis()\n"
    )
    fit_cols = [f"max batch {c}px @ {b} GiB" for c in args.fit_sizes for b in args.budgets]
    header = ["model", "method", "remat", "dtype", "temporaries", "arguments", "outputs"]
    header += ["footprint", "/ full"] + fit_cols
    if args.time_steps:
        header.append("step s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 4 + "---:|" * (len(header) - 4))
    full = {}
    for r in results:
        key = (r["variant"], r["remat"], r["dtype"])
        if r["method"] == "full" and "temp" in r:
            full[key] = r["temp"]
    for r in results:
        cells = [r["variant"], r["method"], r["remat"], r["dtype"]]
        if "error" in r:
            print("| " + " | ".join(cells) + f" | failed: {r['error']} |")
            continue
        ratio = (
            r["temp"] / full[key]
            if (key := (r["variant"], r["remat"], r["dtype"])) in full
            else None
        )
        cells += [_gib(r[k]) for k in ("temp", "arguments", "outputs", "footprint")]
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        fits = r.get("max_batch", {})
        for crop in args.fit_sizes:
            for budget in args.budgets:
                cells.append(str(fits.get(str(crop), {}).get(str(budget), "-")))
        if args.time_steps:
            cells.append(f"{r['step_s']:.2f}" if "step_s" in r else "-")
        print("| " + " | ".join(cells) + " |")


def _verify(row, fits, args) -> dict:
    """`{crop: {budget: (footprint at the predicted batch, at one more) in GiB}}`."""
    out = {}
    for crop, per_budget in fits.items():
        out[crop] = {}
        for budget, b in per_budget.items():
            at = analyse(row, b, crop)["footprint"] if b else 0
            above = analyse(row, b + 1, crop)["footprint"]
            out[crop][budget] = (at / GIB, above / GIB)
    return out


def measure(row: Row, args) -> dict:
    out = dataclasses.asdict(row)
    out.update(analyse(row, args.batch, args.size, args.time_steps))
    if args.fit_sizes and args.batch > 1:
        small = analyse(row, 1, args.size)
        fits = largest_batches(small, out, args.batch, args.size, args.fit_sizes, args.budgets)
        out["max_batch"] = {str(c): {str(b): n for b, n in v.items()} for c, v in fits.items()}
        if args.verify:
            out["verify"] = _verify(row, fits, args)
    return out


def measure_isolated(row: Row, args) -> dict:
    """`measure` in a fresh process: a timed Restormer step keeps more than XLA accounts for
    (the allocator's cache, the executables), and one process running every row outgrew 24 GiB."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(measure, row, args).result()
        except concurrent.futures.process.BrokenProcessPool:
            return {
                **dataclasses.asdict(row),
                "error": "the worker process died (killed for memory?); run this row alone, "
                "or without --time-steps",
            }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--remat", nargs="+", default=list(REMATS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--fit-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--budgets", type=float, nargs="+", default=[16, 24, 80])
    parser.add_argument("--verify", action="store_true", help="compile the predicted batches")
    parser.add_argument("--time-steps", type=int, default=0, help="time this many steps")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--in-process", action="store_true", help="measure every row in this process"
    )
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="print the table of saved --json files"
    )
    args = parser.parse_args()
    if args.table:
        results, saved = [], []
        for path in args.table:
            with open(path) as f:
                data = json.load(f)
            results += data["results"]
            saved.append(data["args"])
        for key in ("batch", "size", "fit_sizes", "budgets"):
            setattr(args, key, saved[0][key])
        args.time_steps = max(a["time_steps"] for a in saved)
        print_table(results, args)
        return
    results = []
    for variant in args.variants:
        for remat in args.remat:
            for dtype in args.dtypes:
                for method in args.methods:
                    row = Row(variant, method, remat, dtype)
                    try:
                        result = (measure if args.in_process else measure_isolated)(row, args)
                    except Exception as error:  # noqa: BLE001 - a failed row is reported
                        result = {**dataclasses.asdict(row), "error": repr(error)[:200]}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
