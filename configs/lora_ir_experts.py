"""LoRA-IR step 3: only the low-rank experts (and the modulation) train.

  python train.py --config configs/lora_ir_experts.py --workdir runs/lora_ir_experts \
      --config.init.checkpoint=runs/lora_ir_backbone --config.router.checkpoint=runs/router \
      --config.data.source_dir=/path/to/clean/images \
      --config.eval.datasets.mixed.source_dir=/path/to/mixed/pairs
  python eval.py --config configs/lora_ir_experts.py --workdir runs/lora_ir_experts <same>

One expert per class of `lora_ir.classes` on every conv (rank 4), hard top-1 routing by the
frozen router; the backbone from step 2 is frozen. `--config.lora_ir.route=topk
--config.lora_ir.top_k=2` or `soft` mix experts; `--config.lora_ir.path=merged` runs per-image
merged kernels (same result).
"""

from configs import lora_ir_backbone


def get_config(arg=None):
    """Step 2's config (model, data, optimizer, eval set) with the deltas of step 3."""
    config = lora_ir_backbone.get_config(arg)
    with config.unlocked():
        config.stage = "finetune"
        config.lora_ir.train = "experts"
        # A fine-tune reads clean crops too: PROD degrades them (data.degrade = "prod").
        config.num_train_steps = 300
        config.checkpoint_every_steps = 100
        config.optimizer.warmup_steps = 10
    return config
