"""ir_lora (JAX) against the official PyTorch code on the same CPU, timed interleaved in one run.

    python -m benchmarks.compare_torch --model nafnet-sidd-w32               # batch 4 of 128x128
    python -m benchmarks.compare_torch --model restormer --batch 1
    python -m benchmarks.compare_torch --model nafnet-sidd-w32 --size 256 --json out.json

The PyTorch models are the official definitions (`tests/torch_reference.py`: NAFNet with its
custom-autograd `LayerNorm2d`, Restormer with its einops rearranges as einops runs them) holding
the same random weights as the flax model. Rows:

* `full`: every parameter trains.
* `lora`: rank `--rank` on every dense conv (depthwise frozen), with the biases, norms, residual
  scales and temperatures (`partition.lora_rules()`); PyTorch in two forms, peft's LoRA `Conv2d`
  and loralib's merged kernel (`benchmarks/torch_lora.py`).
* `lora_all`: the README's API-tour config, rank `--rank` on every conv, depthwise included
  (`((r"(.*/)?norm[^/]*", 0), (".*", r))`); PyTorch in the merged form only, since peft cannot adapt
  depthwise convs.
* `lora_factors`: as `lora`, the factors alone trained (not a default row).
* `forward`: inference.

Steps are AdamW on the PSNR loss. Each round calls every JAX program once and every PyTorch
form once per thread count (`--threads`), so load changes on a shared machine hit all; a PyTorch
form's time is its best thread count, and each ratio is JAX against the fastest PyTorch form.
Forward outputs of every pair are compared first, so the timed programs compute the same thing.
`--json` writes everything the table shows plus the machine, load and versions.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common, torch_lora
from configs import common as configs_common
from ir_lora.models import build, layers
from ir_lora.peft import intercept

ROWS = ("full", "lora", "lora_all", "lora_factors", "forward")
DEFAULT_ROWS = ("full", "lora", "lora_all", "forward")
API_TOUR_TARGETS = ((r"(.*/)?norm[^/]*", 0), (".*", None))  # None: --rank
# Issue 12's targets: ("torch", x): JAX / fastest PyTorch <= x; ("full", x): JAX row / JAX full.
TARGETS = {
    "nafnet": {"full": ("torch", 1.0), "lora": ("torch", 0.8), "lora_all": ("torch", 0.8)},
    "restormer": {"full": ("torch", 1.2), "lora": ("full", 0.7), "lora_all": ("full", 0.7)},
}


def jax_setup(args, row, sample):
    """The `common.Setup` of `row` (random weights of seed 0, identical for every row)."""
    if row in ("full", "forward"):
        return common.make_setup(args.model, "full", sample)
    if row in ("lora", "lora_factors"):
        return common.make_setup(
            args.model, "lora", sample, rank=args.rank, bias_norm=row == "lora"
        )
    model = build(args.model)
    params = common.random_params(intercept.eval_shape_init(model, sample)["params"], 0)
    config = configs_common.training_config("finetune", "lora")
    config.lora.targets = tuple((p, args.rank if r is None else r) for p, r in API_TOUR_TARGETS)
    config.lora.tune_bias_norm = True
    method, size = common._registered(config, model, params, sample, jax.random.key(0))
    lora_config = common.lora_method.lora_config(config.lora)
    return common.Setup("lora_all", model, params, method, lora_config, size)


def torch_forms(row):
    """The PyTorch programs timed against `row`'s JAX step."""
    if row in ("lora", "lora_factors"):
        return torch_lora.FORMS
    return ("merged",) if row == "lora_all" else ("official",)


def torch_net(args, setup, row, form):
    net = torch_lora.official_net(args.model, setup.params)
    if form == "official":
        return net
    trainable, _ = setup.method.init_fn(None)
    torch_lora.set_trainable(net, args.model, trainable.get("params"))
    torch_lora.attach(net, args.model, trainable["lora"], form)
    return net


def torch_psnr_loss(pred, target):
    per_image = torch.mean((pred - target) ** 2, dim=(1, 2, 3))
    return (10.0 / np.log(10.0)) * torch.mean(torch.log(per_image + 1e-8))


def torch_step_fn(net, lq, gt):
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=common.OPTIMIZER["lr"], weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_psnr_loss(net(lq), gt)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in trainable)


def build_row(args, row, batch):
    """`(jax_fn, {form: torch_fn}, info)`, after checking every pair's forward outputs agree."""
    sample = jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32)
    setup = jax_setup(args, row, sample)
    trainable, frozen = setup.method.init_fn(None)
    out_jax = np.asarray(jax.jit(setup.method.apply_fn)(trainable, frozen, batch["lq"]))
    lq = torch.from_numpy(np.asarray(batch["lq"]).transpose(0, 3, 1, 2).copy())
    gt = torch.from_numpy(np.asarray(batch["gt"]).transpose(0, 3, 1, 2).copy())
    info = {"max_abs_diff": {}, "trainable_torch": {}}
    torch_fns = {}
    for form in torch_forms(row):
        net = torch_net(args, setup, row, form)
        with torch.no_grad():
            out_torch = net(lq).numpy().transpose(0, 2, 3, 1)
        info["max_abs_diff"][form] = float(np.max(np.abs(out_jax - out_torch)))
        if row == "forward":

            def torch_fn(net=net):
                with torch.no_grad():
                    return net(lq)

            info["trainable_torch"][form] = 0
        else:
            torch_fn, info["trainable_torch"][form] = torch_step_fn(net, lq, gt)
        torch_fns[form] = torch_fn
    if row == "forward":
        apply = jax.jit(lambda p, x: setup.model.apply({"params": p}, x))
        compiled, info["compile_s"] = common.compile_seconds(apply, setup.params, batch["lq"])
        info["trainable_jax"] = 0
        return (lambda: compiled(setup.params, batch["lq"])), torch_fns, info
    step, state, frozen = common.make_step(setup)
    compiled, info["compile_s"] = common.compile_seconds(step, state, frozen, batch)
    info["trainable_jax"] = sum(x.size for x in jax.tree.leaves(state.trainable))
    holder = {"state": state}

    def jax_fn():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return metrics

    return jax_fn, torch_fns, info


def interleaved(fns, *, rounds, warmup):
    """`{name: median seconds}`; each round calls every `(name, fn, threads)` once, in order.

    `threads` is the PyTorch thread count set before the call (None for JAX).
    """
    times = {name: [] for name, _, _ in fns}
    for i in range(warmup + rounds):
        for name, fn, threads in fns:
            if threads is not None:
                torch.set_num_threads(threads)
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        print(f"round {i + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def _machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} ({model})"


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def summarize(args, built, medians):
    rows = {}
    for row, (_, torch_fns, info) in built.items():
        forms = {}
        for form in torch_fns:
            by_threads = {n: 1e3 * medians[row, form, n] for n in args.threads}
            best = min(by_threads, key=by_threads.get)
            forms[form] = {"ms": by_threads[best], "threads": best, "ms_by_threads": by_threads}
        fastest = min(forms, key=lambda f: forms[f]["ms"])
        jax_ms = 1e3 * medians[row, "jax"]
        rows[row] = dict(
            jax_ms=jax_ms,
            torch=forms,
            fastest_torch_form=fastest,
            torch_ms=forms[fastest]["ms"],
            ratio=jax_ms / forms[fastest]["ms"],
            **info,
        )
    for row, r in rows.items():
        if "full" in rows and row != "full":
            r["jax_over_full"] = r["jax_ms"] / rows["full"]["jax_ms"]
            r["torch_over_full"] = r["torch_ms"] / rows["full"]["torch_ms"]
        kind, bound = TARGETS[args.model.split("-")[0]].get(row, (None, None))
        value = {"torch": r["ratio"], "full": r.get("jax_over_full")}.get(kind)
        if value is not None:
            r["target"] = {"of": kind, "bound": bound, "met": value <= bound}
    return rows


def print_table(args, meta, rows):
    print(
        f"\n{args.model}, batch {args.batch} of {args.size}x{args.size}, LoRA rank {args.rank}, "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up; "
        f"{meta['date']}, {meta['machine']}, load {meta['load_before']} -> {meta['load_after']}; "
        f"jax {jax.__version__} (conv form {meta['conv_form']!r}), torch {torch.__version__}\n"
    )
    print(
        "| row | JAX ms | PyTorch ms by form (threads) | JAX / fastest PyTorch "
        "| JAX / JAX full | PyTorch / PyTorch full | target | compile s | max abs diff |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|---:|")
    for row, r in rows.items():
        forms = ", ".join(f"{f} {v['ms']:,.0f} ({v['threads']})" for f, v in r["torch"].items())
        share = f"{r['jax_over_full']:.2f}" if "jax_over_full" in r else ""
        torch_share = f"{r['torch_over_full']:.2f}" if "torch_over_full" in r else ""
        target = ""
        if "target" in r:
            t = r["target"]
            what = "vs PyTorch" if t["of"] == "torch" else "of full"
            target = f"<= {t['bound']} {what}: {'met' if t['met'] else 'NOT met'}"
        diff = max(r["max_abs_diff"].values())
        print(
            f"| {row} | {r['jax_ms']:,.0f} | {forms} | **{r['ratio']:.2f}** | {share} | "
            f"{torch_share} | {target} | {r['compile_s']:.0f} | {diff:.1e} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--variant", default="nafnet-sidd-w32", dest="model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", "--steps", type=int, default=5, dest="rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="torch.set_num_threads values, each timed; a form's time is its fastest",
    )
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.model.split("-")[0] not in TARGETS:
        raise ValueError(f"--model {args.model!r}: compare_torch builds NAFNet and Restormer only")
    batch = common.sample_batch(args.batch, args.size)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "load_before": _load(),
        "conv_form": layers.conv_form(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    # All rows are built first and timed in the same rounds, so their ratios share the load.
    built = {row: build_row(args, row, batch) for row in args.rows}
    fns = []
    for row, (jax_fn, torch_fns, _) in built.items():
        fns.append(((row, "jax"), jax_fn, None))
        for form, fn in torch_fns.items():
            fns += [((row, form, n), fn, n) for n in args.threads]
    medians = interleaved(fns, rounds=args.rounds, warmup=args.warmup)
    meta["load_after"] = _load()
    rows = summarize(args, built, medians)
    print_table(args, meta, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
