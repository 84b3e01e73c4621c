"""Degradation routers: image -> (degradation embedding `(N, D)`, routing logits `(N, K)`).

The logits pick the low-rank experts (`mixlora.route`) and the embedding conditions the backbone
(`modulation.DegradationModulation`). Two routers share that interface:

* `DegradationEncoder` (default; needs no outside weights): a small CNN trained here on
  PROD-degraded images to say which degradations are present, a multi-label problem on PROD's
  `present` labels `(B, K)` (sigmoid binary cross-entropy). It trains through the one train
  step (`ir_lora.train_lib`) with `multilabel_objective`.
* `MultiViewRouter`: LoRA-IR's DG-Router around a frozen image encoder that the user supplies,
  `encode(images) -> (M, D_enc)` (LoRA-IR: CLIP ViT-L/14-336's projected image embedding, 768-d;
  its weights are not shipped here). High-resolution multi-view pooling: the whole image resized
  to S x S, plus the image resized to 2S x 2S and cut into its 2x2 grid of S x S crops;
  `embedding_in = concat(enc(whole), mean(enc(crops)))` (1536-d for CLIP-L), then
  `Dense(768) -> GELU -> Dense(384) -> GELU` gives the embedding and `Dense(K)` the logits.
  Only the MLP and the head train (LoRA-IR: cross-entropy over 3 weather classes, Adam 2e-4).

Both are trained once and then frozen while the experts train. LoRA-IR
(`ir_lora.methods.lora_ir`) routes its experts with them; UIR-LoRA (`ir_lora.methods.uir_lora`)
embeds images with a `DegradationEncoder` for its prototypes.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from ir_lora import train_lib
from ir_lora.models import layers

# CLIP's image normalisation, for `encode` callables that wrap a CLIP tower.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images: jax.Array) -> jax.Array:
    """[0, 1] RGB NHWC to CLIP's input normalisation."""
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _check_images(images: jax.Array, where: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: images must be (N, H, W, 3), got shape {images.shape}")


class DegradationEncoder(nn.Module):
    """A small CNN that predicts which degradations an image carries.

    Each stage is a stride-2 3x3 conv and a 3x3 conv (GELU after each); the per-channel mean and
    log standard deviation over the image of every stage, concatenated, through
    `Dense(embed_dim)` + GELU give the embedding, `Dense(num_degradations)` the logits
    (independent sigmoids: several degradations can be present at once).

    Attributes:
      num_degradations: K, the number of labels (PROD: `len(degradations.NAMES)`).
      widths: channels per stage (each stage halves the resolution).
      embed_dim: D, the embedding width.
    """

    num_degradations: int
    widths: Sequence[int] = (32, 64, 96, 128)
    embed_dim: int = 128

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_images(images, "DegradationEncoder")
        x = images - 0.5
        pooled = []
        for i, width in enumerate(self.widths):
            x = nn.gelu(layers.Conv(width, (3, 3), strides=2, padding=1, name=f"down{i}")(x))
            x = nn.gelu(layers.Conv(width, (3, 3), padding=1, name=f"conv{i}")(x))
            # Mean and log standard deviation of every stage: degradations are texture
            # statistics (noise, blur, blocking) at several scales, which a last-stage mean
            # washes out (a mean-pooled CNN stayed at the label base rates on PROD crops).
            pooled += [jnp.mean(x, axis=(1, 2)), 0.5 * jnp.log(jnp.var(x, axis=(1, 2)) + 1e-6)]
        pooled = jnp.concatenate(pooled, axis=-1)
        embedding = nn.gelu(nn.Dense(self.embed_dim, name="embed")(pooled))
        logits = nn.Dense(self.num_degradations, name="head")(embedding)
        return embedding, logits


def multiview_views(images: jax.Array, *, view_size: int) -> jax.Array:
    """The 5 router views `(5, N, S, S, 3)`: whole image, then the 2x2 crops (row-major).

    LoRA-IR resizes with PIL bicubic; `jax.image.resize` bicubic with antialiasing is the same
    kernel (Keys, a = -0.5) up to boundary handling.
    """
    _check_images(images, "multiview_views")
    n, _, _, c = images.shape
    s = view_size
    whole = jax.image.resize(images, (n, s, s, c), method="bicubic")
    big = jax.image.resize(images, (n, 2 * s, 2 * s, c), method="bicubic")
    crops = [big[:, i * s : (i + 1) * s, j * s : (j + 1) * s] for i in range(2) for j in range(2)]
    return jnp.stack([whole, *crops])


def multiview_features(
    images: jax.Array, encode: Callable[[jax.Array], jax.Array], *, view_size: int
) -> jax.Array:
    """`concat(enc(whole), mean_k enc(crop_k))`, `(N, 2 * D_enc)`, with no gradient into `encode`.

    `encode` gets all 5N views in one call, `(5N, S, S, 3)` in [0, 1] (view-major: the N whole
    images first, then the N top-left crops, ...), and must return `(5N, D_enc)`; it applies its
    own input normalisation (e.g. `clip_normalize`).
    """
    views = multiview_views(images, view_size=view_size)
    five, n = views.shape[:2]
    features = encode(views.reshape((five * n, *views.shape[2:])))
    if features.ndim != 2 or features.shape[0] != five * n:
        raise ValueError(
            f"multiview_features: encode must map ({five * n}, {view_size}, {view_size}, 3) to "
            f"({five * n}, D), got {features.shape}"
        )
    features = jax.lax.stop_gradient(features.reshape(five, n, -1))
    return jnp.concatenate([features[0], jnp.mean(features[1:], axis=0)], axis=-1)


class MultiViewRouter(nn.Module):
    """LoRA-IR's DG-Router over a frozen user encoder (module docstring).

    Attributes:
      encode: frozen `(M, S, S, 3) -> (M, D_enc)` image encoder (a closure over its weights).
      num_classes: K, the routing classes (LoRA-IR Setting I: 3, snow / rain / raindrop).
      view_size: S (CLIP ViT-L/14-336: 336).
      hidden: widths of the degradation-extractor MLP (LoRA-IR: (768, 384)).
    """

    encode: Callable[[jax.Array], jax.Array]
    num_classes: int
    view_size: int = 336
    hidden: Sequence[int] = (768, 384)

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = multiview_features(images, self.encode, view_size=self.view_size)
        for i, width in enumerate(self.hidden):
            x = nn.gelu(nn.Dense(width, name=f"extractor{i}")(x), approximate=False)
        return x, nn.Dense(self.num_classes, name="head")(x)


# ---------------------------------------------------------------------------------------------
# Training


def router_metrics(logits: jax.Array, labels: jax.Array, *, multi_label: bool = True):
    """Loss and accuracies of routing logits `(N, K)`.

    Args:
      logits: router logits.
      labels: multi-hot `(N, K)` (PROD's `present`; values above 1 count as 1) when
        `multi_label`, else class indices `(N,)`.
      multi_label: sigmoid binary cross-entropy (DegradationEncoder on PROD) or softmax
        cross-entropy over exclusive classes (LoRA-IR's router).

    Returns:
      `{"loss", "accuracy"}` and, for multi-label, `"exact_match"` (all K labels right);
      "accuracy" is per label for multi-label and top-1 otherwise.
    """
    if multi_label:
        if labels.shape != logits.shape:
            raise ValueError(f"router_metrics: labels {labels.shape} != logits {logits.shape}")
        targets = jnp.minimum(labels.astype(logits.dtype), 1.0)
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
        correct = (logits > 0) == (targets > 0.5)
        return {
            "loss": loss,
            "accuracy": jnp.mean(correct),
            "exact_match": jnp.mean(jnp.all(correct, axis=-1)),
        }
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"router_metrics: class labels must be ({logits.shape[0]},), got {labels.shape}"
        )
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def multilabel_objective(labels_of: Callable[[dict], jax.Array]):
    """A `train_lib.Method` objective for a router: `router_metrics` of its logits against the
    multi-hot labels `labels_of(targets)` (e.g. PROD's `present`), the loss separated out."""

    def objective(prediction, targets):
        _, logits = prediction
        metrics = router_metrics(logits, labels_of(targets))
        return metrics.pop("loss"), metrics

    return objective


def router_method(
    model: nn.Module, sample_shape, labels_of, *, degrade_fn=None
) -> train_lib.Method:
    """The router as a `train_lib.Method`: every router param trains (a registered frozen
    encoder is a closure, not a param), scored by `multilabel_objective(labels_of)`; with
    `degrade_fn` (e.g. PROD, whose labels the objective reads) in the step."""

    def init_fn(rng):
        return model.init(rng, jnp.zeros(tuple(sample_shape), jnp.float32))["params"], {}

    def apply_fn(trainable, frozen, images):
        del frozen
        return model.apply({"params": trainable}, images)

    return train_lib.Method(
        init_fn=init_fn,
        apply_fn=apply_fn,
        degrade_fn=degrade_fn,
        objective=multilabel_objective(labels_of),
    )
