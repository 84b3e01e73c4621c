"""PROD pre-training of a backbone on a folder of clean images (degraded on the device).

  python train.py --config configs/pretrain_prod.py --workdir runs/prod \
      --config.data.source_dir=/path/to/clean/images

`arg`: `variant=NAME` picks the backbone (default nafnet-sidd-w32), e.g.
`configs/pretrain_prod.py:variant=restormer`. The recipe follows NAFNet-width32-SIDD (AdamW
1e-3, betas 0.9/0.9, cosine to 1e-7, PSNR loss, 256 crops); the paper's pre-training schedule is
unknown (METHODS.md section 2), so steps and batch are [R] defaults.
"""

from configs import common


def get_config(arg=None):
    settings = common.parse_arg(arg, variant="nafnet-sidd-w32")
    config = common.pretrain_config("full", settings.variant)
    config.num_train_steps = 200_000
    config.checkpoint_every_steps = 5_000
    config.log_every_steps = 100
    config.lock()
    return config
