"""UIR-LoRA's degradation-aware router: an embedding per image, one prototype per degradation.

UIR-LoRA routes with a frozen image encoder's embedding `d` and one anchor per degradation (text
embeddings of the degradation names), `s = norm_K(topK(d . B^T))`. No frozen CLIP tower ships with
this project, so the embedding here comes from `ir_lora.routers.DegradationEncoder`, a small CNN
trained (through `trainer.train`, `encoder_method`) on the LoRAs' own degraded training images
(`encoder_dataset`) with one multi-hot label per degradation (sigmoid cross-entropy, so a mixed
image may light up several), and the anchors are *visual* prototypes [R]: the mean embedding of
each degradation's training images.

Cosine similarity of raw embeddings (after a GELU, mostly positive) is high for every pair, so
embeddings and prototypes are first centred on the prototypes' mean [R]; the composition weights
are then `mixlora.similarity_route` of the centred vectors (top-K, renormalised).
"""

import functools
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ir_lora import routers, train_lib
from ir_lora.peft import mixlora


def encoder(num_degradations: int, *, widths: Sequence[int], embed_dim: int):
    """The `DegradationEncoder` that embeds images for routing."""
    return routers.DegradationEncoder(
        num_degradations=num_degradations, widths=tuple(widths), embed_dim=embed_dim
    )


def encoder_method(model, *, crop: int) -> train_lib.Method:
    """The encoder as the trainer's method: multi-label cross-entropy on the batch's `labels`."""
    return routers.router_method(model, (1, crop, crop, 3), labels_of=lambda t: t["labels"])


def encoder_dataset(
    images_per_degradation: Sequence[Sequence[np.ndarray]],
    *,
    crop: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Random crops of each degradation's degraded images, labelled one-hot by degradation.

    Each example first draws its degradation uniformly, then one of its images and a window, all
    from `seed` and the example's position (reproducible; the iterator's state resumes it).
    Batches are `{"lq": (B, crop, crop, 3) float32 in [0, 1], "labels": (B, K) one-hot}`.

    Raises:
      ValueError: a degradation without images, or an image smaller than `crop`.
    """
    groups = [[np.asarray(image, np.float32) for image in g] for g in images_per_degradation]
    if not groups or any(not g for g in groups):
        raise ValueError("uir_lora: every degradation needs at least one degraded image")
    for g in groups:
        for image in g:
            if min(image.shape[:2]) < crop:
                raise ValueError(f"uir_lora: a training image {image.shape} is smaller than {crop}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"uir_lora: batch size {global_batch_size} must be a multiple of the process count "
            f"{process_count}"
        )
    eye = np.eye(len(groups), dtype=np.float32)

    def example(index: int, rng: np.random.Generator):
        del index
        label = int(rng.integers(len(groups)))
        images = groups[label]
        image = images[int(rng.integers(len(images)))]
        h, w = image.shape[:2]
        top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        return {"lq": image[top : top + crop, left : left + crop], "labels": eye[label]}

    ds = grain.MapDataset.range(2**62).random_map(example, seed=seed)
    ds = ds[process_index::process_count].to_iter_dataset()
    return ds.batch(global_batch_size // process_count, drop_remainder=True)


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, images):
    return model.apply({"params": params}, images)[0]


def embed(model, params, images: jax.Array) -> jax.Array:
    """Embeddings `(N, D)` of images `(N, H, W, 3)` (any size: the encoder pools globally)."""
    return _embed(model, params, images)


def degradation_prototypes(model, params, images_per_degradation) -> jax.Array:
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
