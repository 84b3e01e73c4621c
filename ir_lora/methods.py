"""Adaptation methods: what trains, built from the config's `method` switch.

A method turns a backbone (`flax.linen` model plus, when fine-tuning, its pre-trained params) into
a `train_lib.Method`: `init_fn(rng, backbone) -> (trainable, frozen)` and
`apply_fn(trainable, frozen, images)`. The backbone enters `init_fn` as a jit argument, so a large
pre-trained tree is never baked into a compiled program. Adapters attach from outside by module
path (`ir_lora.peft`); the backbone code never changes.

* `full`: every parameter trains (pre-training, full fine-tuning).
* `lora`: LoRA factors on the targeted layers, plus biases and norms when `tune_bias_norm`;
  everything else is frozen and gets neither gradients nor optimizer state.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora import train_lib
from ir_lora.peft import lora as lora_lib
from ir_lora.peft import partition, report

METHODS = ("full", "lora")

# Every conv and dense layer of a backbone; norm layers (leaf modules without kernels) are
# excluded by name, since LoRA only applies to kernels.
DEFAULT_LORA_EXCLUDE = r"(.*/)?norm[^/]*"


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


def lora_config(config) -> lora_lib.LoraConfig:
    """`LoraConfig` from the `lora` config section (default targets: every conv/dense layer)."""
    targets = [tuple(t) for t in config.get("targets", ())]
    if not targets:
        targets = [(DEFAULT_LORA_EXCLUDE, 0), (".*", int(config.rank))]
    alpha = config.get("alpha")
    return lora_lib.LoraConfig(targets=tuple(targets), alpha=float(alpha) if alpha else None)


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
      `None` (training from scratch, `full` only) it initialises them from the key.
    """
    name = config.method
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not one of {METHODS}")
    sample = jax.ShapeDtypeStruct(image_shape, jnp.float32)

    def backbone_or_init(rng, backbone):
        return model.init(rng, jnp.zeros(image_shape))["params"] if backbone is None else backbone

    if name == "full":
        rules = tuple(partition.full_rules())

        def variables_fn(rng, backbone):
            return {"params": backbone_or_init(rng, backbone)}

        def apply_fn(trainable, frozen, images):
            return model.apply(partition.combine(trainable, frozen), images)

        merge_fn = lambda variables: variables["params"]
    else:
        lora_cfg = lora_config(config.lora)
        rules = tuple(
            partition.lora_rules(
                tune_bias_norm=bool(config.lora.tune_bias_norm),
                also_train=tuple(config.lora.get("also_train", ())),
            )
        )

        def variables_fn(rng, backbone):
            params_key, lora_key = jax.random.split(rng)
            params = backbone_or_init(params_key, backbone)
            factors = lora_lib.init_lora(model, lora_cfg, lora_key, sample)
            return {"params": params, lora_lib.COLLECTION: factors}

        def apply_fn(trainable, frozen, images):
            with lora_lib.interceptor(lora_cfg):
                return model.apply(partition.combine(trainable, frozen), images)

        merge_fn = lambda variables: lora_lib.merge(
            variables["params"], variables[lora_lib.COLLECTION], lora_cfg
        )

    def init_fn(rng, backbone=None):
        variables = variables_fn(rng, backbone)
        return partition.split(variables, partition.label_tree(variables, rules))

    method = train_lib.Method(init_fn=init_fn, apply_fn=apply_fn, degrade_fn=degrade_fn)
    return Adaptation(method=method, rules=rules, variables_fn=variables_fn, merge_fn=merge_fn)
