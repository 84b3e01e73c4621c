"""Rematerialisation of the backbones' blocks: the `remat` field of NAFNet and Restormer.

`remat_block(cls, remat)` is the block class to instantiate for a `remat` setting:

* `"none"`: `cls` itself; every activation the backward pass reads is kept from the forward.
* `"blocks"`: a block keeps only its inputs and variables; its backward runs the block's forward
  again and differentiates that (`recompute`). Peak memory holds the block inputs of the whole
  network plus one block's internals.
* `"blocks_jax"`: `flax.linen.remat` (`jax.checkpoint`) of the block, the textbook form. On
  XLA:CPU the memory it saves is small (benchmarks/NOTES.md, M2), which is why `"blocks"` is a
  custom VJP of its own; kept to compare the two on other backends.

Both wrappers are lifted flax transforms of the block class: module names, hence parameter and
adapter paths, are the plain model's, and interceptors (`ir_lora.peft`) see the same calls.
`recompute` traces the block once, in the forward pass and under the interceptors active there,
to a jaxpr; the backward replays that jaxpr, so an adapter attached around the call is
recomputed exactly as it ran (the backward is traced after the adapter's context has exited).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import lift

REMATS = ("none", "blocks", "blocks_jax")


def recompute(fun):
    """`fun` (pure, array pytrees in and out) whose VJP saves only its inputs and recomputes.

    The forward evaluates `fun` and keeps its arguments; the backward evaluates it again under
    `jax.vjp` and applies the cotangent. Constants the traced function closes over (tracers of
    an enclosing trace included) become explicit inputs, so their gradients flow as well.
    """

    @functools.wraps(fun)
    def wrapped(*args):
        flat, in_tree = jax.tree.flatten(args)
        closed, out_shape = jax.make_jaxpr(
            lambda *leaves: fun(*jax.tree.unflatten(in_tree, leaves)), return_shape=True
        )(*flat)
        out_tree = jax.tree.structure(out_shape)
        consts = list(closed.consts)
        jaxpr = closed.jaxpr

        def run(consts, leaves):
            return jax.core.eval_jaxpr(jaxpr, consts, *leaves)

        @jax.custom_vjp
        def call(consts, leaves):
            return run(consts, leaves)

        def call_fwd(consts, leaves):
            return run(consts, leaves), (consts, leaves)

        def call_bwd(residuals, cotangents):
            consts, leaves = _after(residuals, cotangents)
            return jax.vjp(run, consts, leaves)[1](cotangents)

        call.defvjp(call_fwd, call_bwd)
        return jax.tree.unflatten(out_tree, call(consts, flat))

    return wrapped


def _after(residuals, cotangents):
    """`residuals`, made to depend on one element of the cotangent (`+ 0 * g[0]`).

    The backward must not recompute before its cotangent exists, nor share the recomputation
    with the forward. XLA:CPU drops `optimization_barrier`s before it schedules and eliminates
    common subexpressions (the barrier `jax.checkpoint` relies on), so the recomputation was
    merged with the forward and its activations kept alive as before (benchmarks/NOTES.md, M2).
    A data dependency on the cotangent survives every pass: `0 * g[0]` is not folded for
    floats (it is NaN for an infinite g), and adding it costs one fused elementwise pass.
    """
    floats = [
        c for c in jax.tree.leaves(cotangents)
        if jnp.issubdtype(c.dtype, jnp.inexact) and c.size
    ]  # fmt: skip
    if not floats:
        return residuals
    tie = jax.lax.stop_gradient(floats[0].reshape(-1)[0]) * 0

    def tied(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact) or x.ndim == 0:
            return x
        return x + tie.astype(x.dtype)

    return jax.tree.map(tied, residuals)


def _lifted_recompute(fn, variables=True, rngs=True):
    """`flax.core.lift.checkpoint` with `recompute` in place of `jax.checkpoint`."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
        def pure(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *args, **kwargs), repack_fn(scope)

        return recompute(pure)(variable_groups, rng_groups, *args)

    return lift.pack(inner, (variables,), (variables,), (rngs,), name="recompute")


def remat_block(cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """The class to build `cls` blocks with under `remat` (module doc)."""
    if remat == "none":
        return cls
    if remat == "blocks":
        return nn.transforms.lift_transform(_lifted_recompute, cls)
    if remat == "blocks_jax":
        return nn.remat(cls)
    raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
