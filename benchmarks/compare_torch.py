"""ir_lora (JAX) against the official PyTorch code on the same CPU, timed interleaved in one run,
each runtime in a process of its own.

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

Steps are AdamW on the PSNR loss. JAX and PyTorch each run in a spawned process that builds
its programs and then makes one call per request from this one, so only one side computes at a
time and neither runtime's threads or allocator share a process with the other's (together in
one process, the JAX steps ran 1.5-2.5x slower: `benchmarks/NOTES.md`, E11-E13). Each round
calls every JAX program once and every PyTorch form once per thread count (`--threads`), so load
changes on a shared machine hit all; a PyTorch form's time is its best setting (thread count,
and allocator with `--jemalloc`), and each ratio is JAX against the fastest PyTorch form.
Forward outputs of every pair are compared first, so the timed programs compute the same thing.
`--json` writes everything the table shows plus the machine, load and versions.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
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
        return ("peft", "merged")  # torch_lora.FORMS, without importing torch here
    return ("merged",) if row == "lora_all" else ("official",)


def build_jax(args, row, batch):
    """`(fn, info, forward output)` of `row`'s JAX program, compiled."""
    setup = jax_setup(args, row, jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32))
    trainable, frozen = setup.method.init_fn(None)
    out = np.asarray(jax.jit(setup.method.apply_fn)(trainable, frozen, batch["lq"]))
    info = {}
    if row == "forward":
        apply = jax.jit(lambda p, x: setup.model.apply({"params": p}, x))
        compiled, info["compile_s"] = common.compile_seconds(apply, setup.params, batch["lq"])
        info["trainable_jax"] = 0
        return (lambda: compiled(setup.params, batch["lq"])), info, out
    step, state, frozen = common.make_step(setup)
    compiled, info["compile_s"] = common.compile_seconds(step, state, frozen, batch)
    info["trainable_jax"] = sum(x.size for x in jax.tree.leaves(state.trainable))
    holder = {"state": state}

    def fn():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return metrics

    return fn, info, out


def build_torch(args, row, batch):
    """`({form: fn}, info, {form: forward output})` of `row`'s PyTorch programs.

    The flax weights (and LoRA factors) are made here with the same seeds as in `build_jax`;
    nothing else of JAX runs in this process.
    """
    import torch

    from benchmarks import torch_lora

    setup = jax_setup(args, row, jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32))
    lq = torch.from_numpy(np.asarray(batch["lq"]).transpose(0, 3, 1, 2).copy())
    gt = torch.from_numpy(np.asarray(batch["gt"]).transpose(0, 3, 1, 2).copy())
    fns, outs, info = {}, {}, {"trainable_torch": {}}
    for form in torch_forms(row):
        net = torch_lora.official_net(args.model, setup.params)
        if form != "official":
            trainable, _ = setup.method.init_fn(None)
            torch_lora.set_trainable(net, args.model, trainable.get("params"))
            torch_lora.attach(net, args.model, trainable["lora"], form)
        with torch.no_grad():
            outs[form] = net(lq).numpy().transpose(0, 2, 3, 1)
        if row == "forward":

            def fn(net=net):
                with torch.no_grad():
                    return net(lq)

            info["trainable_torch"][form] = 0
        else:
            fn, info["trainable_torch"][form] = torch_step_fn(net, lq, gt)
        fns[form] = fn
    return fns, info, outs


def torch_psnr_loss(pred, target):
    import torch

    per_image = torch.mean((pred - target) ** 2, dim=(1, 2, 3))
    return (10.0 / np.log(10.0)) * torch.mean(torch.log(per_image + 1e-8))


def torch_step_fn(net, lq, gt):
    import torch

    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=common.OPTIMIZER["lr"], weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_psnr_loss(net(lq), gt)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in trainable)


def worker(side, args, conn):
    """One side's process: builds its programs, then runs one call per request.

    Requests are `(name, torch threads or None)`; each answer is the call's wall seconds.
    """
    batch = common.sample_batch(args.batch, args.size)
    built, versions = {}, {"jax": jax.__version__}
    if side == "jax":
        versions["conv_form"] = layers.conv_form()
        for row in args.rows:
            fn, info, out = build_jax(args, row, batch)
            built[row] = fn
            conn.send((row, info, {"jax": out}))
        block = jax.block_until_ready
    else:
        import torch

        versions["torch"] = torch.__version__
        for row in args.rows:
            fns, info, outs = build_torch(args, row, batch)
            built.update({(row, form): fn for form, fn in fns.items()})
            conn.send((row, info, outs))
        block = lambda x: x  # noqa: E731  (PyTorch's CPU calls return when done)
    conn.send(("ready", versions, None))
    while (request := conn.recv()) is not None:
        name, threads = request
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        block(built[name]())
        conn.send(time.perf_counter() - start)


JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # never give freed memory back


def worker_envs(args) -> dict[str, dict[str, str]]:
    """`{worker: extra environment}`: one JAX process and one PyTorch process per allocator.

    With `--jemalloc`, JAX runs on it and PyTorch on both glibc and it (each form's time is its
    fastest setting), so neither side is held to an allocator that slows it;
    `--torch-allocators glibc` keeps PyTorch on glibc alone (a jemalloc that never gives memory
    back holds every process's peak at once: three processes at 256x256 exceed 24 GiB).
    """
    if not args.jemalloc:
        return {"jax": {}, "torch": {}}
    jemalloc = {"LD_PRELOAD": args.jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
    envs = {"jax": jemalloc}
    if "glibc" in args.torch_allocators:
        envs["torch"] = {}
    if "jemalloc" in args.torch_allocators:
        envs["torch jemalloc"] = jemalloc
    return envs


def start_workers(args, names=None):
    """`({worker: (process, connection)}, infos, outputs, versions)` once all (or `names`)
    are built."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name, env in worker_envs(args).items():
        if names is not None and name not in names:
            continue
        parent, child = context.Pipe()
        side = name.split()[0]
        process = context.Process(target=worker, args=(side, args, child), daemon=True)
        saved = dict(os.environ)
        os.environ.update(env)  # a spawned process starts with this environment
        try:
            process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        workers[name] = (process, parent)
    infos = {row: {} for row in args.rows}
    outputs = {row: {} for row in args.rows}
    versions = {}
    for side, (process, conn) in workers.items():
        while True:
            try:
                row, info, outs = conn.recv()
            except EOFError:
                raise RuntimeError(
                    f"the {side} process died while building (exit code "
                    f"{process.exitcode}); its traceback is above"
                ) from None
            if row == "ready":
                versions.update(info)
                break
            infos[row].update(info)
            outputs[row].update(outs)
            print(f"{side}: {row} built", file=sys.stderr, flush=True)
    return workers, infos, outputs, versions


def interleaved(workers, calls, *, rounds, warmup):
    """`{key: [seconds]}`; each round makes every `(key, side, program, threads)` call
    once, in order, each in its side's process while the other process waits."""
    times = {key: [] for key, *_ in calls}
    for i in range(warmup + rounds):
        for key, side, program, threads in calls:
            process, conn = workers[side]
            try:
                conn.send((program, threads))
                seconds = conn.recv()
            except (BrokenPipeError, EOFError):
                process.join(timeout=10)
                raise RuntimeError(
                    f"the {side} process died running {program!r} (exit code "
                    f"{process.exitcode}; -9 is usually the kernel's out-of-memory killer: "
                    "fewer --rows, a smaller --batch or --torch-allocators glibc)"
                ) from None
            if i >= warmup:
                times[key].append(seconds)
        print(f"round {i + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return times


def stop_workers(workers):
    for process, conn in workers.values():
        if process.is_alive():
            conn.send(None)
            process.join(timeout=60)


def timed(args, calls):
    """`({key: median seconds}, infos, outputs, versions)` of every call.

    Interleaved: every worker alive at once, taking turns call by call. `--exclusive N`: one
    worker alive at a time, started N times in turn (JAX, PyTorch, JAX, ...), each time timing
    `--rounds` rounds of its own calls; for models whose steps, held by two processes at once,
    exceed the machine's memory (a caching allocator keeps each process's peak).
    """
    names = list(worker_envs(args))
    groups = [[name] for name in names] * args.exclusive if args.exclusive else [names]
    times = {key: [] for key, *_ in calls}
    infos, outputs, versions = {row: {} for row in args.rows}, {row: {} for row in args.rows}, {}
    for turn, group in enumerate(groups):
        workers, info, outs, version = start_workers(args, group)
        if args.exclusive:
            print(f"turn {turn + 1}/{len(groups)}: {group[0]} alone", file=sys.stderr, flush=True)
        try:
            own = [call for call in calls if call[1] in group]
            for key, t in interleaved(workers, own, rounds=args.rounds, warmup=args.warmup).items():
                times[key] += t
        finally:
            stop_workers(workers)
        for row in args.rows:
            infos[row].update(info[row])
            outputs[row].update(outs[row])
        versions.update(version)
    return {k: statistics.median(t) for k, t in times.items()}, infos, outputs, versions


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


def torch_settings(args) -> dict[str, tuple[str, int]]:
    """`{label: (PyTorch worker, threads)}`, every setting each PyTorch form is timed in."""
    return {
        (f"{n}" if name == "torch" else f"{n}, {name.split()[1]}"): (name, n)
        for name in worker_envs(args)
        if name != "jax"
        for n in args.threads
    }


def summarize(args, infos, outputs, medians):
    rows = {}
    for row in args.rows:
        forms = {}
        for form in torch_forms(row):
            by_setting = {s: 1e3 * medians[row, form, s] for s in torch_settings(args)}
            best = min(by_setting, key=by_setting.get)
            forms[form] = {"ms": by_setting[best], "threads": best, "ms_by_setting": by_setting}
        fastest = min(forms, key=lambda f: forms[f]["ms"])
        jax_ms = 1e3 * medians[row, "jax"]
        out = outputs[row]
        rows[row] = dict(
            jax_ms=jax_ms,
            torch=forms,
            fastest_torch_form=fastest,
            torch_ms=forms[fastest]["ms"],
            ratio=jax_ms / forms[fastest]["ms"],
            max_abs_diff={f: float(np.max(np.abs(out["jax"] - out[f]))) for f in forms},
            **infos[row],
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
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up, "
        + (
            f"each side alone in turn, {args.exclusive} turns; "
            if args.exclusive
            else "JAX and PyTorch each in its own process; "
        )
        + f"jemalloc {meta['jemalloc'] or 'not used'}; "
        f"{meta['date']}, {meta['machine']}, load {meta['load_before']} -> {meta['load_after']}; "
        f"jax {meta['jax']} (conv form {meta['conv_form']!r}), torch {meta['torch']}\n"
    )
    print(
        "| row | JAX ms | PyTorch ms by form (threads, allocator) | JAX / fastest PyTorch "
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
    parser.add_argument(
        "--jemalloc",
        metavar="LIBJEMALLOC_SO",
        help="run JAX on this jemalloc (LD_PRELOAD, never giving freed memory back to the OS) and "
        "PyTorch on it and on glibc, e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (NOTES E14)",
    )
    parser.add_argument(
        "--torch-allocators",
        nargs="+",
        choices=["glibc", "jemalloc"],
        help="with --jemalloc, the allocators PyTorch is timed on, one process each (default both)",
    )
    parser.add_argument(
        "--exclusive",
        type=int,
        default=0,
        metavar="N",
        help="one process alive at a time, each started N times in turn (for steps too large "
        "for two processes in memory at once); 0: all alive, interleaved call by call",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.torch_allocators and not args.jemalloc:
        raise ValueError("--torch-allocators chooses among --jemalloc's runs: give --jemalloc PATH")
    args.torch_allocators = args.torch_allocators or ["glibc", "jemalloc"]
    if args.jemalloc and not os.path.isfile(args.jemalloc):
        raise FileNotFoundError(f"--jemalloc {args.jemalloc!r}: no such file")
    if args.model.split("-")[0] not in TARGETS:
        raise ValueError(f"--model {args.model!r}: compare_torch builds NAFNet and Restormer only")
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "load_before": _load(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jemalloc": args.jemalloc or "",
    }
    # Both sides build every row first and are timed in the same rounds (or, `--exclusive`,
    # in alternating turns), so their ratios share the load; each runtime has a process of its
    # own (NOTES E11-E13: PyTorch in the same process slowed the JAX calls 1.5-2.5x).
    calls = []
    for row in args.rows:
        calls.append(((row, "jax"), "jax", row, None))
        calls += [
            ((row, form, setting), name, (row, form), n)
            for form in torch_forms(row)
            for setting, (name, n) in torch_settings(args).items()
        ]
    medians, infos, outputs, versions = timed(args, calls)
    meta.update(versions)
    meta["load_after"] = _load()
    rows = summarize(args, infos, outputs, medians)
    print_table(args, meta, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
