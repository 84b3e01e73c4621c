"""UIR-LoRA (`method = multilora`) at CPU size: one LoRA per degradation, composed per image.

The arg picks the run, optionally followed by the experiment root (default `runs/uirlora`):

  python -m ir_lora.uir.data --root runs/uirlora                      # photographs -> pairs
  python train.py --config configs/uirlora.py:pretrain --workdir runs/uirlora/pretrain
  python train.py --config configs/uirlora.py:lora_haze --workdir runs/uirlora/lora_haze
  ... lora_low_light, lora_noise, lora_rain likewise ...
  python train.py --config configs/uirlora.py:multilora --workdir runs/uirlora/multilora
  python eval.py --config configs/uirlora.py:multilora --workdir runs/uirlora/multilora

1. `pretrain`: the quickstart's small NAFNet pre-trained with PROD on clean photographs.
2. `lora_<degradation>`: `method = lora` (rank 4 on every conv, LoRA factors only) on that
   degradation's 32 pairs.
3. `multilora`: loads the four LoRA runs, trains the degradation encoder on their degraded
   images, takes one prototype per degradation and evaluates the composition (top-2 of the
   centred cosine similarities, softmax at temperature 0.1 [R]) against every single LoRA on the
   held-out mixed test set (docs/results_uirlora.md).
"""

import os

from configs import common, quickstart
from ir_lora.uir import data as uir_data
from ir_lora.uir import run as uir_run

DEFAULT_ROOT = os.path.join("runs", "uirlora")
RUNS = ("pretrain", *(f"lora_{d}" for d in uir_data.DEGRADATIONS), "multilora")


def _pretrain(root):
    config = quickstart.get_config().pretrain
    config.data.source_dir = os.path.join(root, "data", "clean")
    config.data.data_dir = os.path.join(root, "tfds")
    return config


def _lora(root, degradation):
    config = common.base_config()
    quickstart._small_nafnet(config)
    config.init.checkpoint = os.path.join(root, "pretrain")
    config.lora.rank = 4
    config.lora.tune_bias_norm = False  # only LoRA factors compose per image
    config.data.source_dir = os.path.join(root, "data", degradation)
    config.data.gt_size = 64
    config.data.batch_size = 8
    config.num_train_steps = 200
    config.log_every_steps = 50
    config.checkpoint_every_steps = 100
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 10
    return config


def _multilora(root):
    config = common.base_config()
    quickstart._small_nafnet(config)
    config.method = "multilora"
    config.init.checkpoint = os.path.join(root, "pretrain")
    config.multilora = uir_run.default_config()
    config.multilora.encoder.steps = 1500  # 300 left it at 0.84 label accuracy
    for degradation in uir_data.DEGRADATIONS:
        config.multilora.runs[degradation] = os.path.join(root, f"lora_{degradation}")
    config.eval.datasets.mixed = common.eval_dataset(
        "paired", os.path.join(root, "data", "mixed"), split="test"
    )
    config.eval.save_comparisons = False
    return config


def get_config(arg=None):
    name, _, root = (arg or "").partition(":")
    root = os.path.abspath(root or DEFAULT_ROOT)
    if name == "pretrain":
        config = _pretrain(root)
    elif name.startswith("lora_") and name[len("lora_") :] in uir_data.DEGRADATIONS:
        config = _lora(root, name[len("lora_") :])
    elif name == "multilora":
        config = _multilora(root)
    else:
        raise ValueError(f"configs/uirlora.py: arg must be one of {RUNS} (optionally ':ROOT'), "
                         f"got {arg!r}")  # fmt: skip
    config.lock()
    return config
