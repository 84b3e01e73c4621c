"""NAFNet in JAX (ir_lora) versus PyTorch eager on the same CPU, timed interleaved in one run.

    python -m benchmarks.compare_torch                        # nafnet-sidd-w32, batch 4 of 128x128
    python -m benchmarks.compare_torch --batch 2 --size 64 --steps 5 --override \
        '{"middle_blk_num": 1, "enc_blk_nums": [1, 1, 1, 1], "dec_blk_nums": [1, 1, 1, 1]}'

PyTorch is an optional benchmark dependency. Its NAFNet is the official definition transcribed in
`tests/torch_reference.py`, loaded with the same weights (`models.to_torch`); its LoRA wraps the
same convolutions (rank `--rank` on every dense conv, depthwise frozen) in the unmerged form
(`Cin -> r` conv with A, then a 1x1 `r -> Cout` with B). Rows: full fine-tuning step; LoRA step
with the factors, biases, norms and beta/gamma trained (`lora`, `partition.lora_rules()`) and
with the factors only (`lora_factors`); forward. Steps are AdamW on the PSNR loss. Each round
times one JAX call then one PyTorch call, so load changes on a shared machine hit both; the ratio
is JAX median / PyTorch median (below 1: JAX is faster). Outputs of the two forwards are compared
first, so the timed programs are known to compute the same thing.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common
from ir_lora.models import VARIANTS, to_torch, torch_io
from ir_lora.peft import lora
from tests import torch_reference


class TorchLoRAConv(torch.nn.Module):
    """A frozen `Conv2d` plus the unmerged branch `up(down(x))` (loralib ConvLoRA, alpha = r)."""

    def __init__(self, base: torch.nn.Conv2d, down: np.ndarray, up: np.ndarray):
        super().__init__()
        rank = down.shape[-1]
        kh, kw = base.kernel_size
        self.base = base
        self.down = torch.nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
        )
        self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        with torch.no_grad():
            hwio = down.reshape(kh, kw, base.in_channels, rank)
            self.down.weight.copy_(
                torch.from_numpy(np.ascontiguousarray(hwio.transpose(3, 2, 0, 1)))
            )
            self.up.weight.copy_(torch.from_numpy(np.ascontiguousarray(up.T[:, :, None, None])))

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def torch_nafnet(variant, overrides, params, factors=None, bias_norm=True):
    """The PyTorch NAFNet with `params` and, given flax LoRA `factors`, LoRA-wrapped convs.

    With LoRA, the factors train, and with `bias_norm` the biases, norms and beta/gamma too.
    """
    kwargs = {**VARIANTS[variant], **overrides}
    net = torch_reference.NAFNet(**kwargs)
    state = to_torch(variant, params, **overrides)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    if factors is None:
        return net
    for p in net.parameters():
        p.requires_grad_(False)
    for path, layer in lora.ranks(factors).items():
        del layer
        names = path.split("/")
        key = torch_io.torch_key((*names, "kernel"), torch_io.NAFNET_KEY_RULES)
        parent_name, _, child = key.removesuffix(".weight").rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        node = factors
        for n in names:
            node = node[n]
        wrapped = TorchLoRAConv(
            getattr(parent, child), np.asarray(node[lora.DOWN]), np.asarray(node[lora.UP])
        )
        setattr(parent, child, wrapped)
    # What `partition.lora_rules(tune_bias_norm=bias_norm)` trains.
    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        in_norm = ".norm" in f".{name}"
        lora_factor = name.endswith((".down.weight", ".up.weight"))
        bias_or_norm = leaf in ("bias", "beta", "gamma") or in_norm
        p.requires_grad_(lora_factor or (bias_norm and bias_or_norm))
    return net


def torch_psnr_loss(pred, target):
    per_image = torch.mean((pred - target) ** 2, dim=(1, 2, 3))
    return (10.0 / np.log(10.0)) * torch.mean(torch.log(per_image + 1e-8))


def torch_step_fn(net):
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    def step(lq, gt):
        opt.zero_grad(set_to_none=True)
        loss = torch_psnr_loss(net(lq), gt)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in trainable)


def _time(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(fns, *, steps, warmup=2):
    """`{name: median seconds}`; each round calls every `(name, fn, threads)` once, in order.

    `threads` is the PyTorch thread count set before the call (None for JAX).
    """
    times = {name: [] for name, _, _ in fns}
    for i in range(warmup + steps):
        for name, fn, threads in fns:
            if threads is not None:
                torch.set_num_threads(threads)
            seconds = _time(fn)
            if i >= warmup:
                times[name].append(seconds)
        print(f"round {i + 1}/{warmup + steps} done", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def build_row(row, args, overrides, batch):
    """`(jax_fn, torch_fn, info)` of one row, after checking both forwards agree."""
    method = {"forward": "full", "lora_factors": "lora"}.get(row, row)
    bias_norm = row != "lora_factors"
    sample = jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32)
    setup = common.make_setup(
        args.variant, method, sample, rank=args.rank, overrides=overrides, bias_norm=bias_norm
    )
    factors = setup.method.init_fn(None)[0]["lora"] if method == "lora" else None
    net = torch_nafnet(args.variant, overrides, setup.params, factors, bias_norm)
    lq_t = torch.from_numpy(np.asarray(batch["lq"]).transpose(0, 3, 1, 2).copy())
    gt_t = torch.from_numpy(np.asarray(batch["gt"]).transpose(0, 3, 1, 2).copy())
    # Same function first: the forward outputs agree (float32 accumulation-order differences).
    trainable, frozen = setup.method.init_fn(None)
    out_jax = np.asarray(jax.jit(setup.method.apply_fn)(trainable, frozen, batch["lq"]))
    with torch.no_grad():
        out_torch = net(lq_t).numpy().transpose(0, 2, 3, 1)
    info = {"max_abs_diff": float(np.max(np.abs(out_jax - out_torch)))}
    if row == "forward":
        apply = jax.jit(lambda p, x: setup.model.apply({"params": p}, x))
        compiled, info["compile_s"] = common.compile_seconds(apply, setup.params, batch["lq"])

        def jax_fn():
            return compiled(setup.params, batch["lq"])

        def torch_fn():
            with torch.no_grad():
                return net(lq_t)

        info["trainable_jax"] = info["trainable_torch"] = 0
        return jax_fn, torch_fn, info
    step, state, frozen = common.make_step(setup)
    compiled, info["compile_s"] = common.compile_seconds(step, state, frozen, batch)
    info["trainable_jax"] = sum(x.size for x in jax.tree.leaves(state.trainable))
    holder = {"state": state}

    def jax_fn():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return metrics

    torch_step, info["trainable_torch"] = torch_step_fn(net)
    return jax_fn, lambda: torch_step(lq_t, gt_t), info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nafnet-sidd-w32")
    parser.add_argument("--override", default="{}", help="JSON of NAFNet constructor fields")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="torch.set_num_threads values, each timed; ratios are against the fastest",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["full", "lora", "lora_factors", "forward"],
        help="lora: factors plus biases/norms trained; lora_factors: the factors only",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.override).items()
    }
    common.check_nafnet_variant(args.variant)
    batch = common.sample_batch(args.batch, args.size)

    # All rows are built first and timed in the same rounds, so their ratios share the load.
    built = {row: build_row(row, args, overrides, batch) for row in args.rows}
    fns = []
    for row, (jax_fn, torch_fn, _) in built.items():
        fns.append(((row, "jax"), jax_fn, None))
        fns += [((row, n), torch_fn, n) for n in args.threads]
    medians = interleaved(fns, steps=args.steps)
    results = {}
    for row, (_, _, info) in built.items():
        by_threads = {n: medians[row, n] for n in args.threads}
        best = min(by_threads.values())
        results[row] = dict(
            jax_ms=1e3 * medians[row, "jax"],
            torch_ms=1e3 * best,
            torch_ms_by_threads={n: 1e3 * t for n, t in by_threads.items()},
            ratio=medians[row, "jax"] / best,
            **info,
        )
        print(row, results[row], flush=True)

    print(
        f"\n{args.variant} {overrides or ''}, batch {args.batch} of {args.size}x{args.size}, "
        f"median of {args.steps} interleaved rounds, torch {torch.__version__}, "
        f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"LoRA rank {args.rank}\n"
    )
    by_threads = " | ".join(f"PyTorch {n} thr. ms" for n in args.threads)
    print(
        f"| row | JAX ms | {by_threads} | ratio JAX/fastest PyTorch | JAX compile s "
        "| max abs diff of outputs |"
    )
    print("|---|---:|" + "---:|" * len(args.threads) + "---:|---:|---:|")
    for row, r in results.items():
        torch_ms = " | ".join(f"{r['torch_ms_by_threads'][n]:,.0f}" for n in args.threads)
        print(
            f"| {row} | {r['jax_ms']:,.0f} | {torch_ms} | {r['ratio']:.2f} | "
            f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |"
        )
    for row in ("lora", "lora_factors"):
        if "full" in results and row in results:
            jax_share = results[row]["jax_ms"] / results["full"]["jax_ms"]
            torch_share = results[row]["torch_ms"] / results["full"]["torch_ms"]
            print(f"{row} step / full step: JAX {jax_share:.2f}, PyTorch {torch_share:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
