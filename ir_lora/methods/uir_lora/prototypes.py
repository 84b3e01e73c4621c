"""UIR-LoRA's degradation-aware router: an embedding per image, one prototype per degradation.

UIR-LoRA routes with a frozen image encoder's embedding `d` and one anchor per degradation (text
embeddings of the degradation names), `s = norm_K(topK(d . B^T))`. No frozen CLIP tower ships with
this project, so the embedding here comes from `ir_lora.adapters.router.DegradationEncoder`, a
small CNN trained on the LoRAs' own degraded training images with one multi-hot label per
degradation (sigmoid cross-entropy, so a mixed image may light up several), and the anchors are
*visual* prototypes [R]: the mean embedding of each degradation's training images.

Cosine similarity of raw embeddings (after a GELU, mostly positive) is high for every pair, so
embeddings and prototypes are first centred on the prototypes' mean [R]; the composition weights
are then `mixlora.similarity_route` of the centred vectors (top-K, renormalised).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ir_lora.adapters import mixlora
from ir_lora.adapters import router as router_lib


def encoder(num_degradations: int, *, widths: Sequence[int], embed_dim: int):
    """The `DegradationEncoder` that embeds images for routing."""
    return router_lib.DegradationEncoder(
        num_degradations=num_degradations, widths=tuple(widths), embed_dim=embed_dim
    )


def _random_crops(rng: np.random.Generator, images: Sequence[np.ndarray], size: int, count: int):
    picks = rng.integers(0, len(images), count)
    out = []
    for i in picks:
        image = images[i]
        h, w = image.shape[:2]
        if h < size or w < size:
            raise ValueError(f"routing: a training image {image.shape} is smaller than crop {size}")
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out.append(image[top : top + size, left : left + size])
    return np.stack(out), picks


def train_encoder(
    images_per_degradation: Sequence[Sequence[np.ndarray]],
    *,
    widths: Sequence[int] = (16, 32, 64),
    embed_dim: int = 64,
    steps: int = 300,
    batch_size: int = 16,
    crop: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
):
    """Trains the encoder to tell the degradations apart; returns `(model, params, metrics)`.

    Args:
      images_per_degradation: for each degradation i, its degraded training images (float32
        `(H, W, 3)` in [0, 1]); the label of every crop of them is the one-hot vector of i.
      widths, embed_dim: the encoder's size.
      steps, batch_size, crop, learning_rate, seed: Adam on random crops, balanced over
        degradations in expectation.

    Returns:
      The module, its params and the last step's metrics (`loss`, `accuracy`, `exact_match`).
    """
    groups = [list(g) for g in images_per_degradation]
    if not groups or any(not g for g in groups):
        raise ValueError("routing.train_encoder: every degradation needs at least one image")
    model = encoder(len(groups), widths=widths, embed_dim=embed_dim)
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), jnp.zeros((1, crop, crop, 3)))["params"]
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    step = router_lib.make_train_step(model, optimizer)
    metrics = {}
    for _ in range(steps):
        labels = rng.integers(0, len(groups), batch_size)
        batch = np.stack([_random_crops(rng, groups[c], crop, 1)[0][0] for c in labels])
        one_hot = np.eye(len(groups), dtype=np.float32)[labels]
        params, opt_state, metrics = step(params, opt_state, jnp.asarray(batch), one_hot)
    return model, params, {k: float(v) for k, v in metrics.items()}


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, images):
    return model.apply({"params": params}, images)[0]


def embed(model, params, images: jax.Array) -> jax.Array:
    """Embeddings `(N, D)` of images `(N, H, W, 3)` (any size: the encoder pools globally)."""
    return _embed(model, params, images)


def prototypes(model, params, images_per_degradation) -> jax.Array:
    """`(K, D)`: the mean embedding of each degradation's images (one image at a time)."""
    rows = []
    for group in images_per_degradation:
        rows.append(jnp.mean(jnp.stack([embed(model, params, g[None])[0] for g in group]), 0))
    return jnp.stack(rows)


def composition_weights(
    embedding: jax.Array,
    anchors: jax.Array,
    *,
    k: int,
    temperature: float,
    normalize: str,
    center: bool = True,
) -> jax.Array:
    """`(N, K)` composition weights: top-k similarity to the prototypes, renormalised.

    With `center`, embeddings and prototypes are centred on the prototypes' mean first (module
    docstring); `temperature` and `normalize` are `mixlora.similarity_route`'s.
    """
    if center:
        mean = jnp.mean(anchors, axis=0, keepdims=True)
        embedding, anchors = embedding - mean, anchors - mean
    return mixlora.similarity_route(
        embedding, anchors, k=k, temperature=temperature, normalize=normalize
    )
