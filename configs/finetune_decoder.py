"""Decoder-only fine-tuning baseline (the paper's "Only Deconv" [I]), else as finetune_full.py.

  python train.py --config configs/finetune_decoder.py --workdir runs/decoder \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

Only the parameters under `ir_lora.methods.full.DECODER_ONLY` (NAFNet: ups_*, decoders_*,
ending) train; encoder, middle blocks and intro stay frozen. `arg`: `variant=NAME`.
"""

from configs import finetune_full
from ir_lora.methods import full


def get_config(arg=None):
    config = finetune_full.get_config(arg)
    with config.unlocked():
        config.full.train_only = full.DECODER_ONLY
    return config
