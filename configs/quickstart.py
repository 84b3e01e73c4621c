"""The offline quickstart: PROD pre-training, then few-shot LoRA on a novel degradation (haze).

  pip install -e . && python train.py --config configs/quickstart.py --workdir runs/quickstart

No data and no network: the clean images are scikit-image's public-domain/CC0 photographs
(data/README.md). Four photographs train, two (chelsea, coffee) are held out for evaluation.
1. `pretrain`: a small NAFNet learns to undo PROD (blur, motion, noise, rain, JPEG in random
   order), never haze.
2. `finetune`: LoRA on every conv plus biases/norms, from the pre-trained export, on 16 synthetic
   haze pairs (`num_pairs` crops of the training photographs).
3. Held-out hazy photographs: degraded input, pre-trained model and fine-tuned model, PSNR/SSIM,
   with the trainable parameter count, printed and written to <workdir>/quickstart.md.
"""

import ml_collections

from configs import common


def _small_nafnet(config):
    config.model.variant = "nafnet-tiny"
    config.model.overrides.width = 16
    config.model.overrides.enc_blk_nums = (1, 1, 1)
    config.model.overrides.middle_blk_num = 1
    config.model.overrides.dec_blk_nums = (1, 1, 1)


def get_config(arg=None):
    del arg
    pretrain = common.base_config()
    pretrain.stage = "pretrain"
    pretrain.method = "full"
    _small_nafnet(pretrain)
    pretrain.data.dataset = "images"
    pretrain.data.gt_size = 64
    pretrain.data.batch_size = 8
    pretrain.num_train_steps = 600
    pretrain.log_every_steps = 50
    pretrain.checkpoint_every_steps = 200
    pretrain.optimizer.lr = 2e-3
    pretrain.optimizer.warmup_steps = 20

    finetune = common.base_config()
    _small_nafnet(finetune)
    finetune.method = "lora"
    finetune.lora.rank = 4
    finetune.data.dataset = "paired"
    finetune.data.gt_size = 64
    finetune.data.batch_size = 8
    finetune.num_train_steps = 300
    finetune.log_every_steps = 50
    finetune.checkpoint_every_steps = 100
    finetune.optimizer.lr = 2e-3
    finetune.optimizer.warmup_steps = 10
    finetune.eval.datasets.haze = common.eval_dataset("paired", "", split="val")

    config = ml_collections.ConfigDict()
    config.stage = "quickstart"
    config.pretrain = pretrain
    config.finetune = finetune
    config.photos_max_side = 256
    config.eval_photos = ("chelsea", "coffee")
    config.num_pairs = 16
    config.pair_size = 96
    config.haze = dict(beta=(0.8, 1.6), airlight=(0.75, 0.95), depth_mix=(0.3, 0.7))
    config.seed = 0
    config.lock()
    return config
