"""Every parameter trains: pre-training and the full fine-tuning baseline."""

from flax import linen as nn

from ir_lora.methods.base import Parts, init_or_given
from ir_lora.peft import partition


def parts(config, model: nn.Module, sample) -> Parts:
    del config

    def variables_fn(rng, backbone):
        return {"params": init_or_given(model, sample, rng, backbone)}

    def apply_fn(trainable, frozen, images):
        return model.apply(partition.combine(trainable, frozen), images)

    return Parts(
        rules=tuple(partition.full_rules()),
        variables_fn=variables_fn,
        apply_fn=apply_fn,
        merge_fn=lambda variables: variables["params"],
    )
