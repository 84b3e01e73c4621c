"""UIR-LoRA at CPU size: one LoRA per degradation, composed per image (stage `uir_lora`).

`arg`: `run=NAME` picks the run and `root=DIR` the experiment root (default runs/uir_lora):

  python -m ir_lora.methods.uir_lora.experiment --root runs/uir_lora      # photographs -> pairs
  python train.py --config configs/uir_lora.py:run=pretrain --workdir runs/uir_lora/pretrain
  python train.py --config configs/uir_lora.py:run=lora_haze --workdir runs/uir_lora/lora_haze
  ... run=lora_low_light, run=lora_noise, run=lora_rain likewise ...
  python train.py --config configs/uir_lora.py:run=composition --workdir runs/uir_lora/composition
  python eval.py --config configs/uir_lora.py:run=composition --workdir runs/uir_lora/composition

1. `pretrain`: the quickstart's small NAFNet pre-trained with PROD on clean photographs.
2. `lora_<degradation>`: `method = lora` (rank 4 on every conv, LoRA factors only) on that
   degradation's 32 pairs.
3. `composition` (stage `uir_lora`): loads the four LoRA runs, trains the degradation encoder on
   their degraded images (1500 steps of Adam at 2e-3), takes one prototype per degradation and
   evaluates the composition (top-2 of the centred cosine similarities, softmax at temperature
   0.1 [R]) against every single LoRA on the held-out mixed test set
   (docs/results_uirlora.md).
"""

import os

from configs import common, quickstart
from ir_lora.methods import uir_lora
from ir_lora.methods.uir_lora import experiment

DEFAULT_ROOT = os.path.join("runs", "uir_lora")
RUNS = ("pretrain", *(f"lora_{d}" for d in experiment.DEGRADATIONS), "composition")


def _pretrain(root):
    config = quickstart.get_config().pretrain
    config.data.source_dir = os.path.join(root, "data", "clean")
    config.data.data_dir = os.path.join(root, "tfds")
    return config


def _lora(root, degradation):
    config = common.training_config("finetune", "lora")
    common.small_nafnet(config)
    common.cpu_recipe(config, steps=200, checkpoint_every=100, warmup=10)
    config.init.checkpoint = os.path.join(root, "pretrain")
    config.lora.rank = 4
    config.lora.tune_bias_norm = False  # only LoRA factors compose per image
    config.data.source_dir = os.path.join(root, "data", degradation)
    return config


def _composition(root):
    config = common.with_backbone(common.trainer_config("uir_lora"))
    common.small_nafnet(config)
    config.init.checkpoint = os.path.join(root, "pretrain")
    config.uir_lora = uir_lora.default_config()
    for degradation in experiment.DEGRADATIONS:
        config.uir_lora.runs[degradation] = os.path.join(root, f"lora_{degradation}")
    # The degradation encoder: plain Adam at a constant 2e-3 (300 steps left it at 0.84 label
    # accuracy).
    config.num_train_steps = 1500
    config.log_every_steps = 100
    config.checkpoint_every_steps = 500
    config.optimizer.update(lr=2e-3, b2=0.999, end_lr=2e-3, warmup_steps=0)
    config.eval.datasets.mixed = common.eval_dataset(
        "paired", os.path.join(root, "data", "mixed"), split="test"
    )
    config.eval.save_comparisons = False
    return config


def get_config(arg=None):
    settings = common.parse_arg(arg, run="", root=DEFAULT_ROOT)
    root = os.path.abspath(settings.root)
    name = settings.run
    if name == "pretrain":
        config = _pretrain(root)
    elif name.startswith("lora_") and name[len("lora_") :] in experiment.DEGRADATIONS:
        config = _lora(root, name[len("lora_") :])
    elif name == "composition":
        config = _composition(root)
    else:
        raise ValueError(f"configs/uir_lora.py: run must be one of {RUNS} (arg run=NAME), "
                         f"got {arg!r}")  # fmt: skip
    config.lock()
    return config
