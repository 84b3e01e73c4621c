"""LoRA-IR step 2: the backbone (and the modulation) with the frozen router's embedding.

  python train.py --config configs/lora_ir_backbone.py --workdir runs/lora_ir_backbone \
      --config.router.checkpoint=runs/router --config.data.source_dir=/path/to/clean/images \
      --config.eval.datasets.mixed.source_dir=/path/to/mixed/pairs

Pre-training from scratch (stage `pretrain`, method `lora_ir` with `lora_ir.train =
"backbone"`): PROD gives each clean 64x64 crop one of `lora_ir.classes`, and DAM modulates the
encoder and middle stages from the router embedding. Writes every collection to
`<workdir>/export/variables` for step 3.
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.pretrain_config("lora_ir")
    config.lora_ir.train = "backbone"
    common.small_nafnet(config)
    common.one_degradation_per_image(config, config.lora_ir.classes)
    common.cpu_recipe(config, steps=600, checkpoint_every=200, warmup=20)
    config.eval.datasets.mixed = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
