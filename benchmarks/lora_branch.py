"""Cost of a LoRA training step on one conv layer, by how the adapter branch is computed.

    python benchmarks/lora_branch.py [--batch 8 --size 64 --width 64 --rank 4 --repeats 7]

Each row times `jax.value_and_grad` w.r.t. the LoRA factors and the input (as inside a network)
of `sum(layer(x)**2)`, jitted, median of `--repeats` runs after one warm-up:

* frozen: the base layer alone, gradient w.r.t. x only (what the layer costs when frozen);
* unmerged (ir_lora): `ir_lora.peft.lora.apply`, the path training uses (for g == 1 a
  `Cin -> r` conv then an `r -> Cout` matmul; for g > 1 a conv with the delta kernel);
* merged in forward: `W0 + scale * reshape(A @ B)` then one conv, the alternative design.

Layers: `ir_lora.models.layers.Conv` (fast 1x1 and depthwise forms) 3x3 dense, 1x1 and depthwise
3x3. Numbers depend on the machine and its load; compare rows of one run only.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ir_lora.models import layers
from ir_lora.peft import intercept, lora


class One(nn.Module):
    width: int
    kernel: tuple[int, int]
    groups: int

    @nn.compact
    def __call__(self, x):
        return layers.Conv(self.width, self.kernel, feature_group_count=self.groups, name="conv")(x)


def _median_seconds(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(name, model, x, rank, repeats):
    shapes = intercept.eval_shape_init(model, x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
    config = lora.LoraConfig(targets=(("conv", rank),))
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    factors = jax.tree.map(lambda v: v + 0.01, factors)

    def frozen_loss(x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    def unmerged_loss(factors, x):
        return jnp.sum(lora.apply(model, params, factors, config, x) ** 2)

    def merged_loss(factors, x):
        merged = lora.merge(params, factors, config)
        return jnp.sum(model.apply({"params": merged}, x) ** 2)

    frozen = jax.jit(jax.value_and_grad(frozen_loss))
    unmerged = jax.jit(jax.value_and_grad(unmerged_loss, argnums=(0, 1)))
    merged = jax.jit(jax.value_and_grad(merged_loss, argnums=(0, 1)))
    ms = [
        1e3 * _median_seconds(frozen, x, repeats=repeats),
        1e3 * _median_seconds(unmerged, factors, x, repeats=repeats),
        1e3 * _median_seconds(merged, factors, x, repeats=repeats),
    ]
    return f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    c = args.width
    x = jnp.asarray(
        np.random.default_rng(1).normal(size=(args.batch, args.size, args.size, c)), jnp.float32
    )
    print(f"{jax.devices()[0].platform}, x {tuple(x.shape)}, rank {args.rank}, ms per step")
    print("| layer | frozen (grad x) | unmerged (ir_lora) | merged in forward |")
    print("|---|---:|---:|---:|")
    for name, kernel, groups in [
        (f"3x3 {c}->{c}", (3, 3), 1),
        (f"1x1 {c}->{c}", (1, 1), 1),
        (f"depthwise 3x3 C={c}", (3, 3), c),
    ]:
        print(_row(name, One(c, kernel, groups), x, args.rank, args.repeats), flush=True)


if __name__ == "__main__":
    main()
