"""LoRA fine-tuning of a pre-trained backbone on a paired folder (BasicSR <split>/lq, <split>/gt).

  python train.py --config configs/finetune_lora.py --workdir runs/lora \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

`init.torch=/path/NAFNet-SIDD-width32.pth` starts from the official PyTorch weights instead.
`arg`: `variant=NAME` (default nafnet-sidd-w32). Rank 4 on every conv plus biases and norms
[R: METHODS.md section 6]; AdamW 1e-3 on the adapters.
"""

from configs import common


def finetune_config(method: str, arg=None):
    """The fine-tuning recipe shared by the baselines, with `method` and its sections."""
    settings = common.parse_arg(arg, variant="nafnet-sidd-w32")
    config = common.training_config("finetune", method, settings.variant)
    config.num_train_steps = 10_000
    config.checkpoint_every_steps = 1_000
    config.log_every_steps = 100
    config.optimizer.lr = 1e-3
    config.eval.datasets.val = common.eval_dataset("paired", "", split="val")
    return config


def get_config(arg=None):
    config = finetune_config("lora", arg)
    config.lock()
    return config
