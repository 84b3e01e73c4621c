"""What every method module provides (see `ir_lora.methods`)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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


def init_or_given(model: nn.Module, sample: jax.ShapeDtypeStruct, rng, backbone):
    """The given backbone params, or fresh ones from `rng` when training from scratch."""
    if backbone is not None:
        return backbone
    return model.init(rng, jnp.zeros(sample.shape, sample.dtype))["params"]
