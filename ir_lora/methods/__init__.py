"""Adaptation methods, the registry of what trains: selected by the config's `method` switch.

A method turns a backbone (a `flax.linen` model plus, when fine-tuning, its pre-trained params)
into a `train_lib.Method`: `init_fn(rng, backbone) -> (trainable, frozen)` and
`apply_fn(trainable, frozen, images)`. The backbone enters `init_fn` as a jit argument, so a large
pre-trained tree is never baked into a compiled program. Adapters attach from outside by module
path (`ir_lora.peft`); the backbone code never changes.

Each method is a package here whose `SPEC` (a `MethodSpec`) is registered in `REGISTRY`: its
`parts(config, model, sample) -> Parts`, its config sections with their defaults, and what it
loads and references. The stages (`ir_lora.stages`) build methods through `build` and never test
a method's name.

* `full`: every parameter trains (pre-training, full fine-tuning), or with `full.train_only`
  only the parameters whose paths match (e.g. decoder-only tuning).
* `lora`: LoRA factors on the targeted layers, plus biases and norms when `tune_bias_norm`;
  everything else is frozen and gets neither gradients nor optimizer state.
* `colora`: CoLoRA, LoRA with per-layer ranks from a ranks file (`colora.ranks`) that its
  contributions stage computes.
* `adaptir`: AdaptIR adapters beside every feed-forward path; the backbone is frozen.
* `lora_ir`: LoRA-IR, mixtures of low-rank experts on every conv routed per image by a frozen
  degradation router, with degradation-aware modulation of the encoder stages.

UIR-LoRA (`ir_lora.methods.uir_lora`) composes trained `lora` runs per image: it adapts no
backbone itself, so it is a stage (`stage = "uir_lora"`), not an entry of this registry.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora import train_lib
from ir_lora.methods import adaptir, colora, full, lora, lora_ir
from ir_lora.methods.base import MethodSpec, Parts, Reference, init_or_given
from ir_lora.peft import partition, report

REGISTRY: dict[str, MethodSpec] = {
    "full": full.SPEC,
    "lora": lora.SPEC,
    "colora": colora.SPEC,
    "adaptir": adaptir.SPEC,
    "lora_ir": lora_ir.SPEC,
}
METHODS = tuple(REGISTRY)

__all__ = [
    "METHODS",
    "REGISTRY",
    "Adaptation",
    "MethodSpec",
    "Parts",
    "Reference",
    "build",
    "init_or_given",
    "section_owner",
    "spec",
    "trains_backbone",
]


def spec(config_or_name) -> MethodSpec:
    """The registered `MethodSpec` of `config.method` (or of a method name)."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.method
    if name not in REGISTRY:
        raise ValueError(f"config.method={name!r} is not one of {METHODS}")
    return REGISTRY[name]


def section_owner(section: str) -> str | None:
    """The method whose config section is `section` (None if no method has it)."""
    for name, method in REGISTRY.items():
        if section in method.sections:
            return name
    return None


def trains_backbone(config) -> bool:
    """Whether `config.method`, as configured, trains every backbone parameter (pre-training)."""
    hook = spec(config).trains_backbone
    return hook is not None and bool(hook(config))


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
      config: the experiment config (`method`, and the method's sections, e.g. `lora`).
      model: the backbone module.
      image_shape: a sample input shape `(N, H, W, C)` (only shapes are used).
      degrade_fn: optional on-device degradation for the train step (PROD in pre-training).

    Returns:
      The `Adaptation`. Its `init_fn` expects the backbone params as its second argument; with
      `None` (training from scratch) it initialises them from the key.
    """
    sample = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    parts = spec(config).parts(config, model, sample)

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
