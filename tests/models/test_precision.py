"""`dtype` on NAFNet: bf16 computation, float32 parameters and output (issue 11, item 5)."""

import jax
import jax.numpy as jnp

from ir_lora import models


def test_nafnet_in_bfloat16_is_within_2e_2_of_float32_on_random_weights():
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    plain = models.build("nafnet-tiny")
    params = plain.init(jax.random.key(1), images)
    # Non-zero residual scales (zero at init), so that every block contributes.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )
    narrow = models.build("nafnet-tiny", dtype=jnp.bfloat16)
    assert jax.tree.map(lambda a: a.dtype, narrow.init(jax.random.key(1), images)) == jax.tree.map(
        lambda a: a.dtype, params
    )  # parameters stay float32
    expected, got = plain.apply(params, images), narrow.apply(params, images)
    assert got.dtype == jnp.float32
    error = jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected)
    assert 0 < error < 2e-2  # > 0: the convolutions did run in bf16
