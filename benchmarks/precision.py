"""bf16 computation against float32 on the full-size backbones, random weights (issue 11, item 5).

    python -m benchmarks.precision                          # nafnet-sidd-w32 and restormer
    python -m benchmarks.precision --variants restormer --size 128 --batch 2

Each backbone runs the same float32 parameters (`common.random_params`) on the same images
twice: with `dtype=float32` and with `dtype=bfloat16` (`models.build(variant, dtype=...)`).
Printed: the relative error `||bf16 - f32|| / ||f32||` of the output, and of the part the network
adds to its input (`output - input`, the stricter number: the global residual does not hide
anything), plus the gradient of a mean-squared loss with respect to the parameters, as a
training step sees it. The last column runs the float32 network on kernels rounded to bf16 and
nothing else: how much the network amplifies the rounding that any bf16 computation starts from.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from ir_lora import models
from ir_lora.peft import intercept


def _relative(got, want) -> float:
    got, want = jnp.ravel(got), jnp.ravel(want)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def _flat(tree):
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def compare(variant: str, batch: int, size: int) -> dict:
    images = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
    params = common.random_params(
        intercept.eval_shape_init(models.build(variant), images)["params"]
    )
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = models.build(variant, dtype=dtype)

        def loss(params, model=model):
            out = model.apply({"params": params}, images)
            return jnp.mean((out - images) ** 2), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[dtype] = (out, _flat(grads))
    (want, want_grads), (got, got_grads) = results["float32"], results["bfloat16"]
    float32_model = models.build(variant)
    rounded = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            leaf.astype(jnp.bfloat16).astype(leaf.dtype) if path[-1].key == "kernel" else leaf
        ),
        params,
    )
    rounded_out = jax.jit(lambda p: float32_model.apply({"params": p}, images))(rounded)
    return {
        "variant": variant,
        "output dtype": str(got.dtype),
        "output": _relative(got, want),
        "residual": _relative(got - images, want - images),
        "gradients": _relative(got_grads, want_grads),
        "rounded kernels": _relative(rounded_out, want),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["nafnet-sidd-w32", "restormer"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(
        f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; bf16 against float32, random "
        f"weights, batch {args.batch} of {args.size}x{args.size}; relative L2 errors\n"
    )
    print(
        "| model | output dtype | output | output - input | parameter gradients "
        "| float32, kernels rounded to bf16: output |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for variant in args.variants:
        r = compare(variant, args.batch, args.size)
        print(
            f"| {variant} | {r['output dtype']} | {r['output']:.2e} | {r['residual']:.2e} "
            f"| {r['gradients']:.2e} | {r['rounded kernels']:.2e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
