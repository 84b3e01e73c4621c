"""AdaptIR on the offline quickstart: PROD pre-training, then few-shot AdaptIR on haze.

  python train.py --config configs/adaptir.py --workdir runs/adaptir

The quickstart (configs/quickstart.py) with `finetune.method = "adaptir"`: one AdaptIR adapter
beside the FFN half of every NAFBlock (hidden width max(8, width // 4): 8/8/16/32 for the widths
16/32/64/128), the backbone frozen, trained on 16 synthetic haze pairs; the held-out hazy
photographs compare the degraded input, the PROD pre-trained model and the adapted one. Give
`--workdir` a finished quickstart run to reuse its pre-training (it resumes and skips it).
"""

from configs import quickstart


def get_config(arg=None):
    del arg
    config = quickstart.get_config()
    with config.unlocked():
        config.finetune.method = "adaptir"
        config.finetune.optimizer.lr = 1e-3
    return config
