"""`remat` of the backbone blocks: same parameter paths, outputs and gradients as plain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora import models

pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.mark.parametrize(
    "variant, remat",
    [("nafnet-tiny", "blocks"), ("nafnet-tiny", "blocks_jax"), ("restormer-tiny", "blocks")],
)
def test_remat_matches_plain(variant, remat):
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    plain = models.build(variant)
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x)["params"]
    # Random weights, residual scales included, so every block's branches reach the gradients.
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    params = tree.unflatten([jnp.asarray(rng.normal(0.05, 0.1, s.shape), s.dtype) for s in leaves])
    rematted = models.build(variant, remat=remat)
    rematted_shapes = jax.eval_shape(rematted.init, jax.random.key(0), x)["params"]
    assert jax.tree.structure(rematted_shapes) == tree

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))

    want, want_grads = loss(plain)(params)
    got, got_grads = loss(rematted)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_unknown_remat_is_an_error():
    with pytest.raises(ValueError, match="remat must be one of"):
        models.build("nafnet-tiny", remat="everything").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )
