"""AdaptIR on the offline quickstart: PROD pre-training, then few-shot AdaptIR on haze.

  python train.py --config configs/adaptir.py --workdir runs/adaptir

The quickstart (configs/quickstart.py) with `finetune.method = "adaptir"`: one AdaptIR adapter
beside the FFN half of every NAFBlock, the backbone frozen, trained on 16 synthetic haze pairs;
the held-out hazy photographs compare the degraded input, the PROD pre-trained model and the
adapted one. Hidden width max(2, round(width / 24)), the official IPT ratio: 2/2/3/5 for the
widths 16/32/64/128, 0.99% of the backbone. Give `--workdir` a finished quickstart run to reuse
its pre-training (it resumes and skips it).
"""

from configs import quickstart


def get_config(arg=None):
    del arg
    config = quickstart.get_config("method=adaptir")
    with config.unlocked():
        config.finetune.optimizer.lr = 1e-3
    return config
