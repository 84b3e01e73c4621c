"""Cost of one channel LayerNorm, forward and backward, by how it is computed.

    python -m benchmarks.layer_norm [--repeats 15]

Each row times the jitted gradient w.r.t. x, scale and bias of `sum(tanh(norm(x)) * w)`, median
of `--repeats` interleaved rounds after one warm-up, at the norms' shapes in nafnet-sidd-w32 and
Restormer (batch 4 of 128x128 at the first stage, and deeper stages):

* autodiff: the plain formula, differentiated by JAX;
* closed form, mean: `norms.layer_norm`'s custom VJP with `jnp.mean` reductions (the "lax" form);
* closed form, dot: the same VJP with `(pixels, C) @ ones(C)` reductions (the "cpu" form, the
  default on XLA:CPU).

All forms are checked equal (1e-5) before timing. Numbers depend on the machine and its load:
compare rows of one run only.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora.models import layers, norms

SHAPES = (
    ("nafnet stage 1", (4, 128, 128, 32)),
    ("nafnet stage 3", (4, 32, 32, 128)),
    ("restormer level 1", (4, 128, 128, 48)),
    ("restormer level 1, batch 1", (1, 128, 128, 48)),
    ("restormer level 3", (4, 32, 32, 192)),
)


def _plain(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def _grad_fn(norm, weights, form, args):
    """The compiled gradient, traced under `form` (which picks the reductions' form)."""

    def loss(x, scale, bias):
        return jnp.sum(jnp.tanh(norm(x, scale, bias)) * weights)

    with layers.conv_form_scope(form):
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print("| shape | autodiff ms | closed form, mean ms | closed form, dot ms | dot / mean |")
    print("|---|---:|---:|---:|---:|")
    fast = lambda x, s, b: norms.layer_norm(x, s, b, 1e-6)
    for name, shape in SHAPES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(0.5, 2.0, shape), jnp.float32)
        scale = jnp.asarray(rng.normal(1.0, 0.3, shape[-1:]), jnp.float32)
        bias = jnp.asarray(rng.normal(0.0, 0.3, shape[-1:]), jnp.float32)
        weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
        inputs = (x, scale, bias)
        fns = {
            "autodiff": _grad_fn(_plain, weights, "lax", inputs),
            "mean": _grad_fn(fast, weights, "lax", inputs),
            "dot": _grad_fn(fast, weights, "cpu", inputs),
        }
        want = fns["autodiff"](*inputs)
        for fn in fns.values():
            for g, w in zip(fn(*inputs), want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(abs(w))))
        times = {k: [] for k in fns}
        for i in range(args.repeats + 1):
            for k, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                if i:
                    times[k].append(1e3 * (time.perf_counter() - start))
        ms = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {name} {shape} | {ms['autodiff']:.1f} | {ms['mean']:.1f} | {ms['dot']:.1f} "
            f"| {ms['dot'] / ms['mean']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
