"""LoRA-IR's degradation router: build from config, load, route to experts.

Config section `router` (`default_config`):

* `encoder = ""` (default): `ir_lora.routers.DegradationEncoder`, a small CNN trained by the
  `lora_ir_router` stage (`router_stage`) on PROD-degraded images to say which degradations are
  present (multi-label over `degradations.NAMES`). Its embedding and logits drive LoRA-IR.
* `encoder = NAME`: a frozen image encoder the user registered with `register_encoder(NAME,
  encode, view_size=...)` (e.g. a Flax CLIP vision tower, whose weights cannot be downloaded
  here). It is wrapped in `ir_lora.routers.MultiViewRouter`: LoRA-IR's high-resolution pooling
  (the whole image plus its 2x2 crops at `view_size`), then a trainable MLP and head. The router
  stage trains the MLP and head exactly as it trains the CNN.

    from ir_lora import routers
    from ir_lora.methods.lora_ir import routing
    encode = lambda views: my_clip(routers.clip_normalize(views))  # (M, 336, 336, 3) -> (M, D)
    routing.register_encoder("clip-l14", encode, view_size=336)
    # then: python train.py --config configs/lora_ir_router.py --config.router.encoder=clip-l14

    (register it in the process that runs train.py / eval.py, e.g. a small launcher script.)

Both give `(embedding (N, D), logits (N, len(NAMES)))`. `expert_weights` restricts the logits to
the experts' degradation classes (`lora_ir.classes`, one expert per class, as in LoRA-IR) and
turns them into per-image weights with `ir_lora.peft.mixlora.route`.
"""

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from ir_lora import degradations
from ir_lora import routers as router_lib
from ir_lora.peft import mixlora

EXPORT_DIR = os.path.join("export", "router")


def default_config() -> ml_collections.ConfigDict:
    """The `router` section: `checkpoint` (a router workdir, or its `export/router`), `encoder`
    ("": the small CNN with `widths` and `embed_dim`; or a registered frozen encoder with the
    multi-view MLP `mlp_widths`)."""
    return ml_collections.ConfigDict(
        {
            "checkpoint": "",
            "encoder": "",
            "widths": (16, 32, 64, 64),
            "embed_dim": 64,
            "mlp_widths": (768, 384),
        }
    )


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A user-supplied frozen image encoder: `encode((M, S, S, 3) in [0, 1]) -> (M, D)`."""

    encode: Callable[[jax.Array], jax.Array]
    view_size: int


ENCODERS: dict[str, Encoder] = {}


def register_encoder(name: str, encode: Callable[[jax.Array], jax.Array], *, view_size: int):
    """Makes `router.encoder = name` use the frozen `encode` with multi-view pooling.

    Args:
      name: the config value that selects it.
      encode: `(M, S, S, 3) -> (M, D_enc)` on [0, 1] RGB views; it applies its own input
        normalisation (`ir_lora.routers.clip_normalize` for CLIP) and closes over its weights,
        which never train (no gradient reaches them).
      view_size: S, the encoder's input size (CLIP ViT-L/14-336: 336).
    """
    ENCODERS[name] = Encoder(encode=encode, view_size=int(view_size))


def build_router(section) -> nn.Module:
    """The router module named by a `router` config section."""
    num = len(degradations.NAMES)
    name = section.get("encoder", "")
    if not name:
        return router_lib.DegradationEncoder(
            num_degradations=num,
            widths=tuple(int(w) for w in section.widths),
            embed_dim=int(section.embed_dim),
        )
    if name not in ENCODERS:
        raise ValueError(
            f"config.router.encoder={name!r} is not registered (registered: {sorted(ENCODERS)}); "
            "call ir_lora.methods.lora_ir.routing.register_encoder first"
        )
    encoder = ENCODERS[name]
    return router_lib.MultiViewRouter(
        encode=encoder.encode,
        num_classes=num,
        view_size=encoder.view_size,
        hidden=tuple(int(w) for w in section.mlp_widths),
    )


def router_shapes(section, image_shape: Sequence[int] = (1, 64, 64, 3)):
    """Abstract router params (`jax.ShapeDtypeStruct` leaves)."""
    model = build_router(section)
    sample = jnp.zeros(tuple(image_shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), sample))["params"]


def router_dir(path: str) -> str:
    """The absolute params directory a `router.checkpoint` names (a router workdir or its
    export)."""
    if not path:
        raise ValueError(
            "config.router.checkpoint is empty: train a router first (python train.py --config "
            "configs/lora_ir_router.py --workdir DIR) and give DIR"
        )
    candidate = os.path.join(path, EXPORT_DIR)
    return os.path.abspath(candidate if os.path.isdir(candidate) else path)


def load_router(section) -> tuple[Any, str]:
    """Trained router params from `section.checkpoint` and their directory (`router_dir`)."""
    path = section.get("checkpoint", "")
    directory = router_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"config.router.checkpoint={path!r}: no router params at {directory!r} "
            f"(expected a router workdir holding {EXPORT_DIR})"
        )
    try:
        params = ocp.StandardCheckpointer().restore(directory, router_shapes(section))
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Router params in {directory!r} do not fit config.router {dict(section)}: {error}"
        ) from error
    return params, directory


def class_indices(classes: Sequence[str]) -> list[int]:
    """Indices of degradation names into `degradations.NAMES` (the router's logit order)."""
    unknown = [c for c in classes if c not in degradations.NAMES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(
            f"lora_ir.classes={list(classes)} must be distinct names from {degradations.NAMES}"
        )
    return [degradations.NAMES.index(c) for c in classes]


def expert_weights(
    logits: jax.Array, *, classes: Sequence[str], mode: str, k: int | None = None
) -> jax.Array:
    """Per-image expert weights `(N, len(classes))` from router logits `(N, len(NAMES))`."""
    if logits.ndim != 2 or logits.shape[-1] != len(degradations.NAMES):
        raise ValueError(
            f"expert_weights: logits must be (N, {len(degradations.NAMES)}), got {logits.shape}"
        )
    selected = logits[:, jnp.asarray(class_indices(classes))]
    return mixlora.route(selected, mode=mode, k=k)


def predicted_class(logits: jax.Array, classes: Sequence[str]) -> jax.Array:
    """`(N,)` index into `classes` of the most likely class (routing accuracy)."""
    return jnp.argmax(logits[:, jnp.asarray(class_indices(classes))], axis=-1)
