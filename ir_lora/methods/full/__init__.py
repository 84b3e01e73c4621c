"""Every parameter trains (pre-training, full fine-tuning), or only a chosen part of them.

`full.train_only` (config section `full`) lists regexes over "params/..." paths; when given, only
the matching parameters train and the rest is frozen (no gradients, no optimizer state, not in the
checkpoints). `DECODER_ONLY` is the paper's "Only Deconv"-style baseline for NAFNet and Restormer.
Every pattern must match some parameter, so a typo fails loudly instead of freezing everything.
"""

import ml_collections
from flax import linen as nn

from ir_lora.methods.base import MethodSpec, Parts, init_or_given
from ir_lora.peft import partition

# Decoder stages of NAFNet (ups_*, decoders_*, ending) and Restormer (up*, reduce_chan_level*,
# decoder_level*, refinement, output): the upsampling half of the U-Net and the output conv.
DECODER_ONLY = (
    r"params/(ups_\d+|decoders_\d+|ending"
    r"|up\d+_\d+|reduce_chan_level\d+|decoder_level\d+|refinement|output)/.*",
)


__all__ = ["DECODER_ONLY", "SPEC", "default_config", "parts", "rules"]


def default_config() -> ml_collections.ConfigDict:
    """The `full` section: `train_only`, regexes over "params/..." paths (empty: everything)."""
    return ml_collections.ConfigDict({"train_only": ()})


def rules(train_only=()) -> tuple[tuple[str, str], ...]:
    """Every parameter trains; with `train_only` patterns, only the parameters they match."""
    if not train_only:
        return tuple(partition.full_rules())
    return (*((str(p), partition.TRAIN) for p in train_only), ("params/.*", partition.FROZEN))


def parts(config, model: nn.Module, sample) -> Parts:
    def variables_fn(rng, backbone):
        return {"params": init_or_given(model, sample, rng, backbone)}

    def apply_fn(trainable, frozen, images):
        return model.apply(partition.combine(trainable, frozen), images)

    return Parts(
        rules=rules(tuple(config.full.train_only)),
        variables_fn=variables_fn,
        apply_fn=apply_fn,
        merge_fn=lambda variables: variables["params"],
    )


def trains_backbone(config) -> bool:
    del config  # Every parameter, or those of `train_only`, trains from scratch if need be.
    return True


SPEC = MethodSpec(parts=parts, sections={"full": default_config}, trains_backbone=trains_backbone)
