"""UIR-LoRA composition (`method = multilora`): invariants on a tiny NAFNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ir_lora import models
from ir_lora.methods.uir_lora import compose
from ir_lora.peft import intercept, lora, mixlora

CONFIG = lora.LoraConfig(targets=((r"(.*/)?norm[^/]*", 0), (".*", 2)), alpha=4.0)


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _random_tree(shapes, seed, std=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def setup():
    model = models.build("nafnet-tiny")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 16, 16, 3)), jnp.float32)
    params = _random_tree(intercept.eval_shape_init(model, x)["params"], 1, std=0.2)
    trees = []
    for i in range(3):
        factors = lora.init_lora(model, CONFIG, jax.random.key(10 + i), x)
        flat = traverse_util.flatten_dict(factors)
        rng = np.random.default_rng(20 + i)
        flat = {
            k: jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype) if k[-1] == lora.UP else v
            for k, v in flat.items()
        }
        trees.append(traverse_util.unflatten_dict(flat))
    return model, x, params, trees


def _scaled(tree, factor):
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {k: v * factor if k[-1] == lora.UP else v for k, v in flat.items()}
    )


def _per_image_reference(model, params, trees, weights, x):
    """Each image through its own params, merged LoRA by LoRA with `peft.lora.merge`."""
    apply = jax.jit(lambda p, image: model.apply({"params": p}, image))  # one compile, 3 calls
    out = []
    for n in range(x.shape[0]):
        merged = params
        for tree, w in zip(trees, np.asarray(weights[n])):
            merged = lora.merge(merged, _scaled(tree, float(w)), CONFIG)
        out.append(apply(merged, x[n : n + 1]))
    return jnp.concatenate(out)


@pytest.mark.parametrize("path", compose.PATHS)
def test_one_lora_with_weight_one_is_that_lora(setup, path):
    model, x, params, trees = setup
    alone = lora.apply(model, params, trees[1], CONFIG, x)
    composed = compose.apply(
        model,
        params,
        compose.stack([trees[1]]),
        jnp.ones((x.shape[0], 1)),
        x,
        config=CONFIG,
        path=path,
    )
    base = model.apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(alone - base))) > 1e-2  # the LoRA does change the output
    np.testing.assert_allclose(composed, alone, atol=1e-5)


def test_zero_loras_is_the_base_model(setup):
    model, x, params, _ = setup
    out = compose.apply(model, params, None, jnp.zeros((x.shape[0], 0)), x, config=CONFIG)
    np.testing.assert_array_equal(out, model.apply({"params": params}, x))


def test_zero_initialised_loras_are_the_identity(setup):
    model, x, params, _ = setup
    fresh = [lora.init_lora(model, CONFIG, jax.random.key(i), x) for i in range(2)]
    weights = jnp.asarray([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    out = compose.apply(model, params, compose.stack(fresh), weights, x, config=CONFIG)
    np.testing.assert_allclose(out, model.apply({"params": params}, x), atol=1e-6)


@pytest.mark.parametrize("path", compose.PATHS)
def test_composition_matches_per_image_merged_params(setup, path):
    model, x, params, trees = setup
    weights = jnp.asarray([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    out = compose.apply(model, params, compose.stack(trees), weights, x, config=CONFIG, path=path)
    reference = _per_image_reference(model, params, trees, weights, x)
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_paths_agree_and_batch_one_matches_the_batch(setup):
    model, x, params, trees = setup
    stacked = compose.stack(trees)
    weights = jnp.asarray([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    run = jax.jit(
        lambda w, images, path: compose.apply(
            model, params, stacked, w, images, config=CONFIG, path=path
        ),
        static_argnums=2,
    )
    branches, merged = run(weights, x, "branches"), run(weights, x, "merged")
    np.testing.assert_allclose(branches, merged, atol=1e-5)
    single = run(weights[1:2], x[1:2], "branches")
    np.testing.assert_allclose(single[0], branches[1], atol=1e-5)


def test_routing_picks_the_lora_whose_prototype_matches(setup):
    model, x, params, trees = setup
    prototypes = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)), jnp.float32)
    # Image n carries degradation 2 - n exactly: its embedding is that prototype, scaled.
    embedding = jnp.stack([2.0 * prototypes[2], prototypes[1], 0.5 * prototypes[0]])
    weights = mixlora.similarity_route(embedding, prototypes, k=1)
    np.testing.assert_array_equal(weights, np.eye(3)[::-1])
    out = compose.apply(model, params, compose.stack(trees), weights, x, config=CONFIG)
    for n, j in enumerate((2, 1, 0)):
        alone = lora.apply(model, params, trees[j], CONFIG, x[n : n + 1])
        np.testing.assert_allclose(out[n : n + 1], alone, atol=1e-5)
    # A mix of two degradations routes to exactly those two LoRAs with top-2.
    mixed = prototypes[0] / jnp.linalg.norm(prototypes[0]) + prototypes[2] / jnp.linalg.norm(
        prototypes[2]
    )
    two = mixlora.similarity_route(mixed[None], prototypes, k=2, normalize="sum")
    assert float(two[0, 1]) == 0.0
    np.testing.assert_allclose(float(two[0, 0] + two[0, 2]), 1.0, atol=1e-6)
    assert float(two[0, 0]) > 0.2 and float(two[0, 2]) > 0.2


def test_scaled_up_factors_are_weights(setup):
    """Weight s on LoRA i is LoRA i with B scaled by s (the composition is linear per layer)."""
    model, x, params, trees = setup
    out = compose.apply(
        model, params, compose.stack([trees[0]]), jnp.full((3, 1), 0.4), x, config=CONFIG
    )
    np.testing.assert_allclose(
        out, lora.apply(model, params, _scaled(trees[0], 0.4), CONFIG, x), atol=1e-5
    )


def test_bad_inputs_are_named(setup):
    model, x, params, trees = setup
    with pytest.raises(ValueError, match=r"weights must be \(batch, LoRAs\) = \(3, 2\)"):
        compose.apply(model, params, compose.stack(trees[:2]), jnp.ones((3, 3)), x, config=CONFIG)
    other = lora.init_lora(
        model, lora.LoraConfig(targets=(((r"(.*/)?norm[^/]*", 0), (".*", 3)))), jax.random.key(0), x
    )
    with pytest.raises(ValueError, match="LoRA 'rain' does not fit LoRA 'haze'"):
        compose.stack([trees[0], other], names=["haze", "rain"])
    with pytest.raises(ValueError, match="at least one"):
        compose.stack([])
