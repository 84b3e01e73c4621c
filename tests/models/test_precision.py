"""`dtype` on the backbones: bf16 computation, float32 parameters and output (issue 11, item 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora import models


def _random_params(model, images):
    # From the shapes alone (compiling the initialisers costs more than the test): norm scales
    # and temperatures 1, everything else random, residual scales included (NAFNet's are zero at
    # init), so that every block contributes.
    shapes = jax.eval_shape(model.init, jax.random.key(1), images)
    rng = np.random.default_rng(2)

    def draw(path, s):
        one = jax.tree_util.keystr(path[-1:]) in ("['scale']", "['temperature']")
        return jnp.asarray(float(one) + 0.1 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("variant", ["nafnet-tiny", "restormer-tiny"])
def test_bfloat16_is_within_2e_2_of_float32_on_random_weights(variant):
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    plain = models.build(variant)
    params = _random_params(plain, images)
    narrow = models.build(variant, dtype=jnp.bfloat16)
    narrow_shapes = jax.eval_shape(narrow.init, jax.random.key(1), images)
    assert jax.tree.map(lambda a: a.dtype, narrow_shapes) == jax.tree.map(
        lambda a: a.dtype, params
    )  # parameters stay float32
    expected = jax.jit(plain.apply)(params, images)
    got = jax.jit(narrow.apply)(params, images)
    assert got.dtype == jnp.float32
    error = jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected)
    assert 0 < error < 2e-2  # > 0: the convolutions did run in bf16


def test_dtype_given_by_name_as_configs_and_the_command_line_do():
    assert models.build("restormer-tiny", dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype='bfloat61'.*restormer-tiny"):
        models.build("restormer-tiny", dtype="bfloat61")
