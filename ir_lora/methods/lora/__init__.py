"""LoRA on the backbone's convs (config section `lora`); the rest frozen, biases/norms optional."""

import jax
import ml_collections
from flax import linen as nn

from ir_lora.methods.base import MethodSpec, Parts, init_or_given
from ir_lora.peft import lora as lora_lib
from ir_lora.peft import partition

# Every conv and dense layer; norm layers (leaf modules without kernels) are excluded by name.
DEFAULT_EXCLUDE = r"(.*/)?norm[^/]*"


__all__ = [
    "DEFAULT_EXCLUDE",
    "SPEC",
    "default_config",
    "lora_config",
    "parts",
    "parts_for",
    "rules",
]


def default_config() -> ml_collections.ConfigDict:
    """The `lora` section.

    `rank` and `alpha` (0: alpha equal to rank, scale 1) for every conv, or explicit ordered
    `targets` of (regex, rank); `tune_bias_norm` trains biases and norms too; `also_train` lists
    further param-path regexes trained fully.
    """
    return ml_collections.ConfigDict(
        {"rank": 4, "alpha": 0.0, "targets": (), "tune_bias_norm": True, "also_train": ()}
    )


def lora_config(section) -> lora_lib.LoraConfig:
    """`LoraConfig` from a `lora` config section (default targets: every conv/dense layer)."""
    targets = [tuple(t) for t in section.get("targets", ())]
    if not targets:
        targets = [(DEFAULT_EXCLUDE, 0), (".*", int(section.rank))]
    alpha = section.get("alpha")
    return lora_lib.LoraConfig(targets=tuple(targets), alpha=float(alpha) if alpha else None)


def rules(section) -> tuple[tuple[str, str], ...]:
    return tuple(
        partition.lora_rules(
            tune_bias_norm=bool(section.tune_bias_norm),
            also_train=tuple(section.get("also_train", ())),
        )
    )


def parts_for(lora_cfg: lora_lib.LoraConfig, section, model: nn.Module, sample) -> Parts:
    """LoRA parts for explicit targets (CoLoRA reuses this with its allocated ranks)."""

    def variables_fn(rng, backbone):
        params_key, lora_key = jax.random.split(rng)
        params = init_or_given(model, sample, params_key, backbone)
        factors = lora_lib.init_lora(model, lora_cfg, lora_key, sample)
        return {"params": params, lora_lib.COLLECTION: factors}

    def apply_fn(trainable, frozen, images):
        with lora_lib.interceptor(lora_cfg):
            return model.apply(partition.combine(trainable, frozen), images)

    def merge_fn(variables):
        return lora_lib.merge(variables["params"], variables[lora_lib.COLLECTION], lora_cfg)

    return Parts(
        rules=rules(section), variables_fn=variables_fn, apply_fn=apply_fn, merge_fn=merge_fn
    )


def parts(config, model: nn.Module, sample) -> Parts:
    return parts_for(lora_config(config.lora), config.lora, model, sample)


SPEC = MethodSpec(parts=parts, sections={"lora": default_config})
