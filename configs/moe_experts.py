"""LoRA-IR step 3: only the low-rank experts (and the modulation) train.

  python train.py --config configs/moe_experts.py --workdir runs/moe_experts \
      --config.init.checkpoint=runs/moe_backbone --config.router.checkpoint=runs/router \
      --config.data.source_dir=/path/to/clean/images \
      --config.eval.datasets.mixed.source_dir=/path/to/mixed/pairs
  python eval.py --config configs/moe_experts.py --workdir runs/moe_experts <same overrides>

One expert per class of `moe.classes` on every conv (rank 4), hard top-1 routing by the frozen
router; the backbone from step 2 is frozen. `--config.moe.route=topk --config.moe.top_k=2` or
`soft` mix experts; `--config.moe.path=merged` runs per-image merged kernels (same result).
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.base_config()
    config.stage = "finetune"
    config.method = "moe"
    config.moe.train = "experts"
    common.small_nafnet(config)
    common.one_degradation_per_image(config)
    config.data.dataset = "images"
    config.data.degrade = "prod"
    config.data.gt_size = 64
    config.data.batch_size = 8
    config.num_train_steps = 300
    config.log_every_steps = 50
    config.checkpoint_every_steps = 100
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 10
    config.eval.datasets.mixed = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
