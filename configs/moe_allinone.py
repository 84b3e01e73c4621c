"""The offline LoRA-IR experiment: router, backbone + DAM, experts, mixed-degradation test set.

  python train.py --config configs/moe_allinone.py --workdir runs/moe_allinone
  python eval.py --config configs/moe_allinone.py --workdir runs/moe_allinone  # no training

No data and no network (ir_lora/allinone.py): scikit-image photographs, four for training, two
held out and cut into 64x64 tiles, each tile with one of blur / noise / rain / JPEG (cycling).
Runs configs/moe_router.py, moe_backbone.py and moe_experts.py in sub-workdirs and writes
<workdir>/allinone.md: per-degradation PSNR/SSIM of the degraded input, stage 2 and stage 3, and
the router's accuracy on the test inputs. eval.py restores the finished stages and writes the
same table to <workdir>/eval/allinone.md (give it the overrides used for training).
"""

import ml_collections

from configs import moe_backbone, moe_experts, moe_router


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.stage = "allinone"
    config.router_stage = moe_router.get_config()
    config.backbone = moe_backbone.get_config()
    config.experts = moe_experts.get_config()
    config.classes = tuple(config.experts.moe.classes)
    config.prod = config.experts.prod
    config.photos_max_side = 256
    config.eval_photos = ("chelsea", "coffee")
    config.tile_size = 64
    config.seed = 0
    config.lock()
    return config
