"""What every method package provides (see `ir_lora.methods`): its `Parts` and its `MethodSpec`."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Parts:
    """A method's pure pieces.

    Attributes:
      rules: ordered `(regex, label)` trainability rules over "/"-joined variable paths
        (`ir_lora.peft.partition`): labels `frozen`, `lora`, `train`.
      variables_fn: `(rng, backbone params or None) -> variables` with every collection the
        method uses ("params" plus its adapters).
      apply_fn: `(trainable, frozen, images) -> restored`.
      merge_fn: `variables -> plain params` with adapters folded in, or None if the method
        cannot be merged (its adapters stay in the forward pass).
    """

    rules: tuple[tuple[str, str], ...]
    variables_fn: Callable[[jax.Array, Any], dict]
    apply_fn: Callable[[Any, Any, jax.Array], jax.Array]
    merge_fn: Callable[[dict], Any] | None


@dataclasses.dataclass(frozen=True)
class Reference:
    """A frozen input besides the backbone (e.g. LoRA-IR's router) that checkpoints record.

    Attributes:
      field: the dotted config key that names it ("router.checkpoint"). Left empty when a
        trained workdir is restored or resumed, the recorded path is used.
      resolve: `config value -> path` whose content is hashed (e.g. a workdir's export).
    """

    field: str
    resolve: Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method as the stages see it: what trains, its config sections, what it loads.

    The stages only call these; they never test a method's name.

    Attributes:
      parts: `(config, model, sample) -> Parts`.
      sections: `{section name: () -> ConfigDict of its defaults}`, the config sections the
        method reads; a config that selects the method holds exactly these method sections
        (`configs/common.py: with_method`).
      trains_backbone: `config -> bool`, whether every backbone parameter trains (what
        pre-training needs); None: never.
      load: `(config, load_params) -> (init tree, backbone path or None)`, for a method that
        needs more than the backbone of `config.init` at init; `load_params` is
        `ir_lora.services.load_params`. Default: the backbone of `config.init` when fine-tuning.
      references: `{name: Reference}`, frozen inputs besides the backbone whose path and hash
        checkpoints record; a resumed or restored run must find the same content there.
    """

    parts: Callable[..., Parts]
    sections: Mapping[str, Callable[[], ml_collections.ConfigDict]]
    trains_backbone: Callable[[Any], bool] | None = None
    load: Callable[[Any, Callable], tuple[Any, str | None]] | None = None
    references: Mapping[str, Reference] = dataclasses.field(default_factory=dict)


def init_or_given(model: nn.Module, sample: jax.ShapeDtypeStruct, rng, backbone):
    """The given backbone params, or fresh ones from `rng` when training from scratch."""
    if backbone is not None:
        return backbone
    return model.init(rng, jnp.zeros(sample.shape, sample.dtype))["params"]
