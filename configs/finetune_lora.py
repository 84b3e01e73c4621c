"""LoRA fine-tuning of a pre-trained NAFNet on a paired folder (BasicSR <split>/lq, <split>/gt).

  python train.py --config configs/finetune_lora.py --workdir runs/lora \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

`init.torch=/path/NAFNet-SIDD-width32.pth` starts from the official PyTorch weights instead.
Rank 4 on every conv plus biases and norms [R: METHODS.md section 6]; AdamW 1e-3 on the adapters.
"""

from configs import common


def get_config(arg=None):
    config = common.base_config()
    config.method = arg or "lora"
    config.num_train_steps = 10_000
    config.checkpoint_every_steps = 1_000
    config.log_every_steps = 100
    config.optimizer.lr = 1e-3
    config.eval.datasets.val = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
