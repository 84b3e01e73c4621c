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

from configs import moe_backbone


def get_config(arg=None):
    """Step 2's config (model, data, optimizer, eval set) with the deltas of step 3."""
    config = moe_backbone.get_config(arg)
    config.stage = "finetune"
    config.moe.train = "experts"
    config.data.degrade = "prod"  # a fine-tune reads clean crops too: PROD degrades them
    config.num_train_steps = 300
    config.checkpoint_every_steps = 100
    config.optimizer.warmup_steps = 10
    return config
