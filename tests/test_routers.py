"""Routers: shapes, 5-view multi-view pooling, training through the one step reduces the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ir_lora import routers as router
from ir_lora import train_lib


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_degradation_encoder_shapes():
    model = router.DegradationEncoder(num_degradations=7, widths=(8, 16), embed_dim=12)
    images = jnp.zeros((3, 32, 24, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"), images)
    embedding, logits = jax.eval_shape(model.apply, variables, images)
    assert embedding.shape == (3, 12) and logits.shape == (3, 7)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*\(3, 32, 24\)"):
        model.init(jax.random.key(0, impl="rbg"), jnp.zeros((3, 32, 24)))


def _quadrant_image(colours):
    """(1, 16, 16, 3) image whose four 8x8 quadrants are solid colours (row-major)."""
    rows = [np.concatenate([np.full((8, 8, 3), c) for c in colours[r : r + 2]], 1) for r in (0, 2)]
    return jnp.asarray(np.concatenate(rows, 0)[None], jnp.float32)


def test_multiview_pooling_uses_exactly_the_five_views():
    colours = [(0.1, 0.2, 0.3), (0.9, 0.1, 0.5), (0.4, 0.8, 0.0), (0.7, 0.6, 0.95)]
    image = _quadrant_image(colours)
    images = jnp.concatenate([image, 1.0 - image])  # N = 2
    calls = []

    def encode(views):
        calls.append(np.asarray(views))
        return jnp.mean(views, axis=(1, 2))  # D_enc = 3: the mean colour of each view

    features = router.multiview_features(images, encode, view_size=4)
    assert len(calls) == 1 and calls[0].shape == (10, 4, 4, 3)
    views = calls[0].reshape(5, 2, 4, 4, 3)
    # Each crop of the 8x8 resize covers one quadrant: its outer corner is that solid colour.
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    for k, (colour, (i, j)) in enumerate(zip(colours, corners, strict=True)):
        np.testing.assert_allclose(views[1 + k, 0, i, j], colour, atol=1e-4)
        np.testing.assert_allclose(views[1 + k, 1, i, j], 1.0 - np.asarray(colour), atol=1e-4)
    # The whole view is the full image at 4x4 (antialiasing blurs across quadrants at this
    # factor): each corner is nearest to its own quadrant's colour.
    for k, (i, j) in enumerate(corners):
        distances = np.linalg.norm(np.asarray(colours) - views[0, 0, i, j], axis=-1)
        assert np.argmin(distances) == k and distances[k] < 0.05
    want = np.concatenate([views[0].mean((1, 2)), views[1:].mean((2, 3)).mean(0)], -1)
    np.testing.assert_allclose(features, want, atol=1e-6)


def test_multiview_router_shapes_counts_and_frozen_encoder():
    w_enc = jax.random.normal(jax.random.key(1, impl="rbg"), (3, 5))
    encode = lambda v: jnp.mean(v, axis=(1, 2)) @ w_enc
    model = router.MultiViewRouter(encode=encode, num_classes=3, view_size=8, hidden=(16, 6))
    images = jax.random.uniform(jax.random.key(2, impl="rbg"), (2, 20, 28, 3))
    variables = jax.jit(model.init)(jax.random.key(3, impl="rbg"), images)
    embedding, logits = jax.jit(model.apply)(variables, images)
    assert embedding.shape == (2, 6) and logits.shape == (2, 3)
    assert variables["params"]["extractor0"]["kernel"].shape == (10, 16)
    # No gradient reaches the images through the frozen encoder.
    g = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(variables, x)[1])))(images)
    assert float(jnp.abs(g).max()) == 0.0

    # At CLIP ViT-L/14-336 sizes (768-d embeddings, 336 views): LoRA-IR's 1.477M trainable.
    clip_like = router.MultiViewRouter(encode=lambda v: jnp.zeros((v.shape[0], 768)), num_classes=3)
    shapes = jax.eval_shape(
        clip_like.init, jax.random.key(0, impl="rbg"), jnp.zeros((1, 400, 500, 3))
    )
    assert shapes["params"]["extractor0"]["kernel"].shape == (1536, 768)
    assert _count(shapes["params"]) == 1536 * 768 + 768 + 768 * 384 + 384 + 384 * 3 + 3


def test_bad_encoder_output_is_reported():
    with pytest.raises(ValueError, match=r"encode must map \(5, 4, 4, 3\)"):
        router.multiview_features(jnp.zeros((1, 8, 8, 3)), lambda v: v[:1, 0, 0], view_size=4)


def _synthetic_batch(seed, n=16, size=16):
    """Labels: [noisy, dark, tinted]; each present independently with probability 1/2."""
    rng = np.random.default_rng(seed)
    base = np.repeat(np.repeat(rng.uniform(size=(n, 4, 4, 3)), size // 4, 1), size // 4, 2)
    present = (rng.uniform(size=(n, 3)) < 0.5).astype(np.float32)
    x = base + present[:, 0, None, None, None] * 0.2 * rng.normal(size=base.shape)
    x = x * (1.0 - 0.7 * present[:, 1, None, None, None])
    x = x + present[:, 2, None, None, None] * np.array([0.3, 0.0, -0.3])
    return jnp.asarray(np.clip(x, 0.0, 1.0), jnp.float32), jnp.asarray(present)


def test_training_steps_reduce_the_multilabel_loss():
    """Through the one train step, with the router's method and objective."""
    model = router.DegradationEncoder(num_degradations=3, widths=(8, 16), embed_dim=16)
    images, present = _synthetic_batch(4)
    method = router.router_method(model, images.shape, labels_of=lambda t: t["labels"])
    optimizer = optax.adam(3e-3)
    trainable, frozen = jax.jit(method.init_fn)(jax.random.key(5, impl="rbg"))
    state = train_lib.initial_state(trainable, optimizer, 0)
    step = jax.jit(
        lambda state, batch: train_lib.train_step(
            state, frozen, batch, apply_fn=method.apply_fn, objective=method.objective,
            tx=optimizer,
        )
    )  # fmt: skip
    losses = []
    for _ in range(25):
        state, metrics = step(state, {"lq": images, "labels": present})
        losses.append(float(metrics.compute()["loss"]))
    assert {"loss", "accuracy", "exact_match"} <= set(metrics.compute())
    assert losses[-1] < 0.8 * losses[0]


def test_router_metrics_values():
    logits = jnp.array([[2.0, -1.0], [-3.0, 0.5]])
    m = router.router_metrics(logits, jnp.array([[1.0, 0.0], [1.0, 1.0]]))
    assert float(m["accuracy"]) == 0.75 and float(m["exact_match"]) == 0.5
    want = np.mean(np.log1p(np.exp(-np.array([2.0, 1.0, -3.0, 0.5]))))
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    m = router.router_metrics(logits, jnp.array([0, 0]), multi_label=False)
    assert float(m["accuracy"]) == 0.5
