"""What one train step costs the OS: wall time, minor page faults and system seconds per step.

    python -m benchmarks.page_faults            # nafnet-sidd-w32 full, batch 4 of 128x128
    python -m benchmarks.page_faults --pause 4  # idle 4 s between steps
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
        MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python -m benchmarks.page_faults --pause 4

XLA:CPU allocates a step's temporaries afresh on every execution; glibc serves allocations above
its mmap threshold (32 MiB at most) with `mmap` and gives them back with `munmap`, so every step
faults its temporaries in again (`benchmarks/NOTES.md`, E14). `--pause` idles between steps as
the JAX process of `compare_torch.py` does while PyTorch runs.
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from benchmarks import common


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nafnet-sidd-w32")
    parser.add_argument("--method", default="full", choices=common.METHODS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds idle before each step")
    args = parser.parse_args()
    batch = common.sample_batch(args.batch, args.size)
    sample = jax.ShapeDtypeStruct(batch["lq"].shape, jnp.float32)
    step, state, frozen = common.make_step(common.make_setup(args.variant, args.method, sample))
    compiled, _ = common.compile_seconds(step, state, frozen, batch)
    print(f"{args.variant} {args.method}, batch {args.batch} of {args.size}x{args.size}")
    print("| step | ms | minor page faults | system s |\n|---:|---:|---:|---:|")
    for i in range(args.steps + 1):
        time.sleep(args.pause)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        ms = 1e3 * (time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        name = "warm-up" if i == 0 else str(i)
        print(
            f"| {name} | {ms:,.0f} | {after.ru_minflt - before.ru_minflt:,} | "
            f"{after.ru_stime - before.ru_stime:.2f} |"
        )


if __name__ == "__main__":
    main()
