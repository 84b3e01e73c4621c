"""Cost of a LoRA training step on one layer, by how the adapter is computed and differentiated.

    python -m benchmarks.lora_branch [--batch 4 --size 128 --rank 4 --repeats 9]

Each row times `jax.grad` w.r.t. the LoRA factors and the input (as inside a network) of
`sum(tanh(layer(x)))`, jitted, median of `--repeats` interleaved rounds after one warm-up:

* frozen: the base layer alone, gradient w.r.t. x only (what the layer costs when frozen);
* branch: the explicit low-rank branch `layer(x) + scale * lora.branch(...)`;
* merged: one layer call with `W0 + scale * A @ B`, autodiff through the dense kernel gradient;
* low-rank bwd: the same forward with `lora`'s custom backward (rank-r products only; only 1x1
  and Dense layers have it, the others run "merged").

`ir_lora.peft.lora` takes "merged" or "low-rank bwd" per layer (`uses_low_rank_backward`, the
last column). Layers: the 1x1 convs of NAFNet-w32's stages at batch 4 of 128x128 (widths 32 to
512 at 128^2 down to 8^2 pixels), plus a 3x3 and a depthwise 3x3. Numbers depend on the machine
and its load: compare rows of one run only.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import common
from ir_lora.models import layers
from ir_lora.peft import intercept, lora


class One(nn.Module):
    width: int
    kernel: tuple[int, int]
    groups: int

    @nn.compact
    def __call__(self, x):
        return layers.Conv(self.width, self.kernel, feature_group_count=self.groups, name="conv")(x)


def _row(layer, x, rank, repeats):
    model = One(*layer)
    shapes = intercept.eval_shape_init(model, x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
    config = lora.LoraConfig(targets=(("conv", rank),))
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    factors = jax.tree.map(lambda v: v + 0.01, factors)

    def frozen_loss(factors, x):
        del factors
        return jnp.sum(jnp.tanh(model.apply({"params": params}, x)))

    def branch_loss(factors, x):
        def wrapper(next_fun, args, kwargs, module):
            f = factors["conv"]
            return next_fun(*args, **kwargs) + lora.branch(
                module, args[0], f[lora.DOWN], f[lora.UP]
            )

        with intercept.attach([intercept.Rule("conv", wrapper)]):
            return jnp.sum(jnp.tanh(model.apply({"params": params}, x)))

    def adapted_loss(factors, x):
        return jnp.sum(jnp.tanh(lora.apply(model, params, factors, config, x)))

    def traced_with(ratio):
        def fn(factors, x):
            with common.low_rank_backward_ratio(ratio):
                return adapted_loss(factors, x)

        return fn

    forms = {
        "frozen": frozen_loss,
        "branch": branch_loss,
        "merged": traced_with(float("inf")),
        "low-rank bwd": traced_with(0),
    }
    compiled = {}
    for name, fn in forms.items():
        grad = jax.jit(jax.grad(fn, argnums=(0, 1)))
        compiled[name] = grad.lower(factors, x).compile()
        jax.block_until_ready(compiled[name](factors, x))
    times = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(factors, x))
            times[name].append(time.perf_counter() - start)
    kernel_shape = shapes["conv"]["kernel"].shape
    conv = layers.Conv(model.width, model.kernel, feature_group_count=model.groups)
    low_rank = lora.uses_low_rank_backward(conv, kernel_shape, rank)
    return [1e3 * statistics.median(times[n]) for n in forms], low_rank


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"{jax.devices()[0].platform}, batch {args.batch}, rank {args.rank}, ms per grad")
    print("| layer | pixels | frozen | branch | merged | low-rank bwd | ir_lora takes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(1)
    cases = [
        (f"1x1 {c}->{2 * c}", args.size // 2**level, c, (2 * c, (1, 1), 1))
        for level, c in enumerate((32, 64, 128, 256, 512))
    ]
    cases += [
        ("3x3 64->64", args.size // 2, 64, (64, (3, 3), 1)),
        ("depthwise 3x3 C=64", args.size // 2, 64, (64, (3, 3), 64)),
    ]
    for name, size, cin, layer in cases:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), jnp.float32)
        ms, low_rank = _row(layer, x, args.rank, args.repeats)
        cells = " | ".join(f"{m:.1f}" for m in ms)
        taken = "low-rank bwd" if low_rank else "merged"
        print(f"| {name} | {size}x{size} | {cells} | {taken} |", flush=True)


if __name__ == "__main__":
    main()
