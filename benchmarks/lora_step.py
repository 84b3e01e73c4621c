"""LoRA training step against the full step, by backward form and by what else trains.

    python -m benchmarks.lora_step                        # nafnet-sidd-w32, batch 4 of 128x128
    python -m benchmarks.lora_step --override \
        '{"middle_blk_num": 1, "enc_blk_nums": [1, 1, 1, 1], "dec_blk_nums": [1, 1, 1, 1]}'

Rows, all compiled in one process and timed in interleaved rounds (median after one warm-up
round), so load changes hit every row alike:

* full: every parameter trains;
* LoRA, merged bwd: rank `--rank` on every dense conv (`benchmarks/common.py`), biases, norms and
  residual scales trained too (`partition.lora_rules()`), every layer differentiated through its
  merged kernel (`lora.LOW_RANK_BACKWARD_RATIO` = inf);
* LoRA, low-rank bwd: the same with the library's default rule (wide 1x1 layers skip the dense
  kernel gradient, `lora.uses_low_rank_backward`);
* LoRA factors only: the default rule, biases and norms frozen (`tune_bias_norm=False`).

Prints milliseconds per step and the ratio to the full step (benchmarks/NOTES.md, E8).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from ir_lora.peft import lora

ROWS = {
    "full": ("full", None, True),
    "LoRA, merged bwd": ("lora", float("inf"), True),
    "LoRA, low-rank bwd": ("lora", lora.LOW_RANK_BACKWARD_RATIO, True),
    "LoRA factors only": ("lora", lora.LOW_RANK_BACKWARD_RATIO, False),
}


def _compiled_step(args, method_name, ratio, bias_norm, batch):
    sample = jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32)
    overrides = json.loads(args.override)
    setup = common.make_setup(
        args.variant, method_name, sample, rank=args.rank, overrides=overrides, bias_norm=bias_norm
    )
    step, state, frozen = common.make_step(setup)
    with common.low_rank_backward_ratio(lora.LOW_RANK_BACKWARD_RATIO if ratio is None else ratio):
        compiled, seconds = common.compile_seconds(step, state, frozen, batch)
    return compiled, state, frozen, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nafnet-sidd-w32")
    parser.add_argument("--override", default="{}", help="JSON of model constructor overrides")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    batch = common.sample_batch(args.batch, args.size)
    steps = {}
    for name, (method_name, ratio, bias_norm) in ROWS.items():
        compiled, state, frozen, seconds = _compiled_step(
            args, method_name, ratio, bias_norm, batch
        )
        steps[name] = {"fn": compiled, "state": state, "frozen": frozen, "times": []}
        print(f"{name}: compiled in {seconds:.0f} s", flush=True)
    for round_index in range(args.rounds + 1):
        for row in steps.values():
            start = time.perf_counter()
            row["state"], _ = row["fn"](row["state"], row["frozen"], batch)
            jax.block_until_ready(row["state"])
            if round_index:  # round 0 warms up
                row["times"].append(time.perf_counter() - start)
    medians = {name: statistics.median(row["times"]) for name, row in steps.items()}
    print(
        f"\n{args.variant} {args.override}, batch {args.batch} of {args.size}x{args.size}, "
        f"rank {args.rank}, median of {args.rounds} rounds\n"
    )
    print("| row | step ms | / full step |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {1e3 * seconds:,.0f} | {seconds / medians['full']:.3f} |")


if __name__ == "__main__":
    main()
