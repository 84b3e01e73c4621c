"""The offline LoRA-IR experiment: router, backbone + DAM, experts, mixed-degradation test set.

  python train.py --config configs/lora_ir_allinone.py --workdir runs/lora_ir_allinone
  python eval.py --config configs/lora_ir_allinone.py --workdir runs/lora_ir_allinone

No data and no network (ir_lora/methods/lora_ir/allinone.py): scikit-image photographs, four for
training, two held out and cut into 64x64 tiles, each tile with one of blur / noise / rain /
JPEG (cycling). Runs configs/lora_ir_router.py, lora_ir_backbone.py and lora_ir_experts.py in
sub-workdirs and writes <workdir>/allinone.md: per-degradation PSNR/SSIM of the degraded input,
stage 2 and stage 3, and the router's accuracy on the test inputs. eval.py restores the
finished stages and writes the same table to <workdir>/eval/allinone.md (give it the overrides
used for training).
"""

import ml_collections

from configs import lora_ir_backbone, lora_ir_experts, lora_ir_router
from ir_lora.data import synthetic


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.stage = "lora_ir_allinone"
    config.router_stage = lora_ir_router.get_config()
    config.backbone = lora_ir_backbone.get_config()
    config.experts = lora_ir_experts.get_config()
    config.classes = tuple(config.experts.lora_ir.classes)
    config.prod = config.experts.prod
    config.photos_max_side = 256
    config.eval_photos = synthetic.HELD_OUT
    config.tile_size = 64
    config.seed = 0
    config.lock()
    return config
