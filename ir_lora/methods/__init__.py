"""Adaptation methods: what trains, selected by the config's `method` switch.

A method turns a backbone (a `flax.linen` model plus, when fine-tuning, its pre-trained params)
into a `train_lib.Method`: `init_fn(rng, backbone) -> (trainable, frozen)` and
`apply_fn(trainable, frozen, images)`. The backbone enters `init_fn` as a jit argument, so a large
pre-trained tree is never baked into a compiled program. Adapters attach from outside by module
path (`ir_lora.peft`); the backbone code never changes.

Each method is a module here with `parts(config, model, sample) -> Parts`, registered in
`REGISTRY`:

* `full`: every parameter trains (pre-training, full fine-tuning), or with `full.train_only`
  only the parameters whose paths match (e.g. decoder-only tuning).
* `lora`: LoRA factors on the targeted layers, plus biases and norms when `tune_bias_norm`;
  everything else is frozen and gets neither gradients nor optimizer state.
* `colora`: LoRA with per-layer ranks from a CoLoRA ranks file (`colora.ranks`).
* `adaptir`: AdaptIR adapters beside every feed-forward path; the backbone is frozen.
* `moe`: LoRA-IR, mixtures of low-rank experts on every conv routed per image by a frozen
  degradation router, with degradation-aware modulation of the encoder stages.

A method that needs more than the backbone at init (the router, a previous stage's modulation)
registers a loader in `LOADERS`: `loader(config, load_params) -> (init tree, path)`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora import train_lib
from ir_lora.methods import adaptir, colora, full, lora, moe
from ir_lora.methods.base import Parts, init_or_given
from ir_lora.peft import partition, report

REGISTRY: dict[str, Callable[..., Parts]] = {
    "full": full.parts,
    "lora": lora.parts,
    "colora": colora.parts,
    "adaptir": adaptir.parts,
    "moe": moe.parts,
}
LOADERS: dict[str, Callable[..., tuple[Any, str | None]]] = {"moe": moe.load}
METHODS = tuple(REGISTRY)

__all__ = [
    "LOADERS",
    "METHODS",
    "REGISTRY",
    "Adaptation",
    "Parts",
    "build",
    "init_or_given",
    "trains_backbone",
]


def trains_backbone(config) -> bool:
    """Whether `config.method` trains every backbone parameter (allowed for pre-training)."""
    return config.method == "full" or (config.method == "moe" and config.moe.train == "backbone")


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """A built method plus what the reports and checkpoints need to know about it.

    Attributes:
      method: the `train_lib.Method` the trainer runs.
      rules: ordered `(regex, label)` trainability rules over "/"-joined variable paths.
      variables_fn: `(rng, backbone) -> variables` (all collections, abstract-evaluable), used
        for reports and for merging adapters into plain params.
      merge_fn: `variables -> params` of the plain backbone with adapters folded in (inference
        without adapter overhead, export); None when the method cannot be merged.
    """

    method: train_lib.Method
    rules: tuple[tuple[str, str], ...]
    variables_fn: Callable[[jax.Array, Any], dict]
    merge_fn: Callable[[dict], Any] | None

    def report(self, backbone_shapes: Any) -> report.ParameterReport:
        """Parameter report (total, trainable, %, per-layer ranks) from shapes only."""
        variables = jax.eval_shape(self.variables_fn, jax.random.key(0), backbone_shapes)
        labels = partition.label_tree(variables, self.rules)
        return report.parameter_report(variables, labels)


def build(
    config,
    model: nn.Module,
    *,
    image_shape: tuple[int, ...],
    degrade_fn: train_lib.DegradeFn | None = None,
) -> Adaptation:
    """The `Adaptation` for `config.method` on `model`.

    Args:
      config: the experiment config (`method`, and the method's section, e.g. `lora`).
      model: the backbone module.
      image_shape: a sample input shape `(N, H, W, C)` (only shapes are used).
      degrade_fn: optional on-device degradation for the train step (PROD in pre-training).

    Returns:
      The `Adaptation`. Its `init_fn` expects the backbone params as its second argument; with
      `None` (training from scratch) it initialises them from the key.
    """
    if config.method not in REGISTRY:
        raise ValueError(f"config.method={config.method!r} is not one of {METHODS}")
    sample = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    parts = REGISTRY[config.method](config, model, sample)

    def init_fn(rng, backbone=None):
        variables = parts.variables_fn(rng, backbone)
        return partition.split(variables, partition.label_tree(variables, parts.rules))

    method = train_lib.Method(init_fn=init_fn, apply_fn=parts.apply_fn, degrade_fn=degrade_fn)
    return Adaptation(
        method=method,
        rules=tuple(parts.rules),
        variables_fn=parts.variables_fn,
        merge_fn=parts.merge_fn,
    )
