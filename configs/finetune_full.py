"""Full fine-tuning baseline (every parameter trains), otherwise as configs/finetune_lora.py.

  python train.py --config configs/finetune_full.py --workdir runs/full \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

`arg`: `variant=NAME` (default nafnet-sidd-w32).
"""

from configs import finetune_lora


def get_config(arg=None):
    config = finetune_lora.finetune_config("full", arg)
    config.optimizer.lr = 2e-4
    config.lock()
    return config
