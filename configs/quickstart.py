"""The offline quickstart: PROD pre-training, then few-shot LoRA on a novel degradation (haze).

  pip install -e . && python train.py --config configs/quickstart.py --workdir runs/quickstart
  python eval.py --config configs/quickstart.py --workdir runs/quickstart  # re-score, no training

No data and no network: the clean images are scikit-image's public-domain/CC0 photographs
(data/README.md). Four photographs train, two (chelsea, coffee) are held out for evaluation.
1. `pretrain`: a small NAFNet learns to undo PROD (blur, motion, noise, rain, JPEG in random
   order), never haze.
2. `finetune`: LoRA on every conv plus biases/norms, from the pre-trained export, on 16 synthetic
   haze pairs (`num_pairs` crops of the training photographs).
3. Held-out hazy photographs: degraded input, pre-trained model and fine-tuned model, PSNR/SSIM,
   with the trainable parameter count, printed and written to <workdir>/quickstart.md.
`arg`: `method=NAME` fine-tunes with another method (default lora; configs/adaptir.py is
`method=adaptir`).
"""

import ml_collections

from configs import common
from ir_lora.data import synthetic


def get_config(arg=None):
    settings = common.parse_arg(arg, method="lora")
    pretrain = common.pretrain_config("full")
    common.small_nafnet(pretrain)
    common.cpu_recipe(pretrain, steps=600, checkpoint_every=200, warmup=20)

    finetune = common.training_config("finetune", settings.method)
    common.small_nafnet(finetune)
    common.cpu_recipe(finetune, steps=300, checkpoint_every=100, warmup=10)
    finetune.eval.datasets.haze = common.eval_dataset("paired", "", split="val")

    config = ml_collections.ConfigDict()
    config.stage = "quickstart"
    config.pretrain = pretrain
    config.finetune = finetune
    config.photos_max_side = 256
    config.eval_photos = synthetic.HELD_OUT
    config.num_pairs = 16
    config.pair_size = 96
    config.haze = dict(beta=(0.8, 1.6), airlight=(0.75, 0.95), depth_mix=(0.3, 0.7))
    config.seed = 0
    config.lock()
    return config
