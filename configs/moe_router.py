"""LoRA-IR step 1: the degradation router alone (stage `router`, ir_lora/router_stage.py).

  python train.py --config configs/moe_router.py --workdir runs/router \
      --config.data.source_dir=/path/to/clean/images

A small CNN (`config.router`) learns which of PROD's degradations a 64x64 crop carries (multi-label,
sigmoid cross-entropy on PROD's `present` labels); crops get one or two of `moe.classes`. To route
with a frozen encoder of your own instead (LoRA-IR: CLIP ViT-L/14-336), register it with
`ir_lora.routing.register_encoder` and set `--config.router.encoder=NAME`.
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.base_config()
    config.stage = "router"
    common.small_nafnet(config)  # Unused by the router; kept so moe configs share one layout.
    config.data.dataset = "images"
    config.data.gt_size = 64
    config.data.batch_size = 16
    # Routing accuracy levels off near 0.86 after ~1750 steps (docs/results_adapters.md).
    config.num_train_steps = 2000
    config.log_every_steps = 250
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 10
    config.prod.ops = list(config.moe.classes)
    config.prod.max_degradations = 2
    config.eval_batches = 8
    config.lock()
    return config
