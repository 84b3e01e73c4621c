"""LoRA-IR step 1: the degradation router alone (stage `lora_ir_router`).

  python train.py --config configs/lora_ir_router.py --workdir runs/router \
      --config.data.source_dir=/path/to/clean/images

A small CNN (`config.router`) learns which of PROD's degradations a 64x64 crop carries
(multi-label, sigmoid cross-entropy on PROD's `present` labels); crops get one or two of
`classes`, the experts' degradations, over which the routing accuracy is measured. To route with
a frozen encoder of your own instead (LoRA-IR: CLIP ViT-L/14-336), register it with
`ir_lora.methods.lora_ir.routing.register_encoder` and set `--config.router.encoder=NAME`.
"""

from configs import common
from ir_lora.methods import lora_ir
from ir_lora.methods.lora_ir import routing


def get_config(arg=None):
    del arg
    config = common.with_prod(common.with_data(common.trainer_config("lora_ir_router")))
    config.router = routing.default_config()
    config.classes = lora_ir.default_config().classes
    config.data.gt_size = 64
    config.data.batch_size = 16
    # Routing accuracy levels off near 0.8-0.85 after ~1250 steps (docs/results_adapters.md).
    config.num_train_steps = 2000
    config.log_every_steps = 250
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 10
    config.prod.ops = tuple(config.classes)
    config.prod.max_degradations = 2
    config.eval_batches = 8
    config.lock()
    return config
