"""`remat` of the backbone blocks: same parameter paths, outputs and gradients as plain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora import models


@pytest.mark.parametrize(
    "variant, remat",
    [("nafnet-tiny", "blocks"), ("nafnet-tiny", "blocks_jax"), ("restormer-tiny", "blocks")],
)
def test_remat_matches_plain(variant, remat):
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    plain = models.build(variant)
    params = jax.jit(plain.init)(jax.random.key(0), x)["params"]
    # Non-zero residual scales, so every block's branches reach the output and the gradients.
    params = jax.tree.map(lambda p: p + 0.05, params)
    rematted = models.build(variant, remat=remat)
    shapes = jax.eval_shape(rematted.init, jax.random.key(0), x)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)

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
