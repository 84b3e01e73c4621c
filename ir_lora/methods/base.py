"""What every method module provides (see `ir_lora.methods`): its `Parts` and its `MethodSpec`."""

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


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method as the runner sees it: its parts plus optional hooks into the stages.

    The runner (`train.py` / `eval.py`) only calls these; it never tests a method's name.

    Attributes:
      parts: `(config, model, sample) -> Parts`; None for a method that runs its own stage.
      trains_backbone: `config -> bool`, whether every backbone parameter trains (what
        pre-training needs); None: never.
      load: `(config, load_params) -> (init tree, backbone path or None)`, for a method that
        needs more than the backbone of `config.init` at init; `load_params` is
        `runner.load_params`. Default: the backbone of `config.init` when fine-tuning.
      references: `config -> {name: path}`, frozen inputs besides the backbone (e.g. the
        router) whose path and hash checkpoints record; a resumed or restored run must find the
        same content there.
      prepare: `(config, workdir, *, training) -> config`, run before anything is built, when
        training (`training=True`, fresh or resuming) and when restoring a trained workdir;
        it completes the config (e.g. files the run computes itself or recorded).
      train_and_evaluate: `(config, workdir) -> dict`, a stage of its own instead of the
        trainer (`runner.train_and_evaluate` returns what it returns).
      evaluate: `(config, workdir, *, datasets, out_dir) -> results`, evaluation of such a
        workdir instead of restoring a checkpoint.
    """

    parts: Callable[..., Parts] | None
    trains_backbone: Callable[[Any], bool] | None = None
    load: Callable[[Any, Callable], tuple[Any, str | None]] | None = None
    references: Callable[[Any], dict[str, str]] | None = None
    prepare: Callable[..., Any] | None = None
    train_and_evaluate: Callable[[Any, str], dict] | None = None
    evaluate: Callable[..., dict] | None = None


def init_or_given(model: nn.Module, sample: jax.ShapeDtypeStruct, rng, backbone):
    """The given backbone params, or fresh ones from `rng` when training from scratch."""
    if backbone is not None:
        return backbone
    return model.init(rng, jnp.zeros(sample.shape, sample.dtype))["params"]
