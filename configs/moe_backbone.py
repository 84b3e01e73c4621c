"""LoRA-IR step 2: the backbone (and the modulation) with the frozen router's embedding.

  python train.py --config configs/moe_backbone.py --workdir runs/moe_backbone \
      --config.router.checkpoint=runs/router --config.data.source_dir=/path/to/clean/images \
      --config.eval.datasets.mixed.source_dir=/path/to/mixed/pairs

Pre-training from scratch (stage `pretrain`, method `moe` with `moe.train = "backbone"`): PROD
gives each clean 64x64 crop one of `moe.classes`, and DAM modulates the encoder and middle stages
from the router embedding. Writes every collection to `<workdir>/export/variables` for step 3.
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.base_config()
    config.stage = "pretrain"
    config.method = "moe"
    config.moe.train = "backbone"
    common.small_nafnet(config)
    common.one_degradation_per_image(config)
    config.data.dataset = "images"
    config.data.gt_size = 64
    config.data.batch_size = 8
    config.num_train_steps = 600
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.eval.datasets.mixed = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
