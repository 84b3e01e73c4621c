"""Shared config sections and recipes; every `configs/*.py` builds on these, deltas only.

A config holds the shared sections, plus the sections of the one method it selects (and of its
stage), and nothing else, so an override of a section the run does not use is an error:

* trainer keys (`ir_lora.trainer.default_config`): seed, num_train_steps, logging, checkpoint
  and eval intervals, loss, optimizer, fsdp; and `stage` (`ir_lora.stages.registry`);
* `data` (`with_data`): the training set (`ir_lora.data.prepare` names, see data/README.md),
  crop `gt_size`, global `batch_size`, BasicSR augmentation flags, `noise_sigma` (0..255; 0 =
  none) for clean sets, `degrade = "prod"` to synthesise the inputs with PROD inside the step
  (section `prod`, `with_prod`), `worker_count` (input worker processes; -1: the host's
  default, none on a CPU-only host);
* the backbone (`with_backbone`): `model` (`variant` from `ir_lora.models.VARIANTS`, and
  constructor `overrides`: any field, e.g. `--config.model.overrides.width=16`), `init` (the
  pre-trained backbone: `checkpoint`, exported params or a workdir; or `torch`, an official
  `.pth`, with `torch_key` to pick `params`/`params_ema`), `eval` (datasets evaluated after
  training, name -> `eval_dataset(...)`, and the BasicSR metric settings) and `export`;
* `method` and its sections (`with_method`; each method package documents its own, e.g.
  `ir_lora.methods.lora.default_config`). `training_config` is all of these.

`arg`, the text after ":" in `--config=configs/NAME.py:ARG`, always means the same thing: a
comma-separated list of `key=value` settings that the config file documents (big_vision's
convention), e.g. `configs/pretrain_prod.py:variant=restormer`; `parse_arg` reads it.
"""

import ast

import ml_collections

from ir_lora import degradations, methods, trainer


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The `key=value,...` settings of a config's `arg` over `defaults` (their types kept).

    Raises:
      ValueError: a key that is not in `defaults` (the message lists them) or a malformed item.
    """
    settings = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(
                f"config arg {item!r}: expected key=value with key one of {sorted(defaults)}"
            )
        default = defaults[key]
        if isinstance(default, bool):
            settings[key] = value.strip().lower() in ("1", "true", "yes")
        elif isinstance(default, int | float):
            settings[key] = type(default)(ast.literal_eval(value.strip()))
        else:
            settings[key] = value.strip()
    return settings


def trainer_config(stage: str) -> ml_collections.ConfigDict:
    """The trainer keys and the stage: what every stage that trains reads."""
    config = trainer.default_config()
    config.stage = stage
    return config


def with_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training data section (`ir_lora.services.train_iterator`)."""
    config.data = ml_collections.ConfigDict(
        {
            "dataset": "paired",
            "source_dir": "",
            "data_dir": "",  # prepared TFDS data; default <workdir>/tfds
            "split": "train",
            "gt_size": 256,
            "batch_size": 8,
            "use_hflip": True,
            "use_rot": True,
            "noise_sigma": 0.0,
            "degrade": "",  # "prod": PROD synthesises the inputs inside the step
            "worker_count": -1,  # input worker processes; -1: the host's default
        }
    )
    return config


def with_backbone(config: ml_collections.ConfigDict, variant: str = "nafnet-sidd-w32"):
    """The backbone (`model`, `init`) and its evaluation (`eval`, `export`) sections."""
    config.export = True
    config.model = ml_collections.ConfigDict(
        {"variant": variant, "overrides": ml_collections.ConfigDict()}
    )
    config.init = ml_collections.ConfigDict({"checkpoint": "", "torch": "", "torch_key": ""})
    config.eval = ml_collections.ConfigDict(
        {
            "datasets": ml_collections.ConfigDict(),
            "crop_border": 0,
            "test_y_channel": False,
            "tile": 0,  # 0: whole images
            "tile_overlap": 32,
            "pad_multiple": 16,
            "save_images": False,
            "save_comparisons": True,
        }
    )
    return config


def eval_dataset(dataset: str, source_dir: str, split: str = "val", noise_sigma: float = 0.0):
    """One entry of `config.eval.datasets`."""
    return ml_collections.ConfigDict(
        {"dataset": dataset, "source_dir": source_dir, "split": split, "noise_sigma": noise_sigma}
    )


def with_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Selects `method` and adds its sections (`MethodSpec.sections`) with their defaults."""
    config.method = method
    for name, defaults in methods.spec(method).sections.items():
        config[name] = defaults()
    return config


def with_prod(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """PROD synthesises the training inputs inside the step, from clean `images` crops."""
    config.prod = degradations.default_config()
    config.data.dataset = "images"
    config.data.degrade = "prod"
    return config


def training_config(stage: str, method: str, variant: str = "nafnet-sidd-w32"):
    """A stage that trains `method` on a backbone: trainer keys, data, model, init, eval."""
    config = with_backbone(with_data(trainer_config(stage)), variant)
    return with_method(config, method)


def pretrain_config(method: str = "full", variant: str = "nafnet-sidd-w32"):
    """PROD pre-training from scratch on a folder of clean images."""
    return with_prod(training_config("pretrain", method, variant))


def small_nafnet(config) -> None:
    """The CPU-size NAFNet of the offline experiments (width 16, 3 levels, 289k parameters)."""
    config.model.variant = "nafnet-tiny"
    config.model.overrides.width = 16
    config.model.overrides.enc_blk_nums = (1, 1, 1)
    config.model.overrides.middle_blk_num = 1
    config.model.overrides.dec_blk_nums = (1, 1, 1)


def cpu_recipe(config, *, steps: int, checkpoint_every: int, warmup: int, lr: float = 2e-3):
    """The offline experiments' CPU schedule: 64x64 crops in batches of 8, AdamW at `lr`."""
    config.data.gt_size = 64
    config.data.batch_size = 8
    config.num_train_steps = steps
    config.log_every_steps = 50
    config.checkpoint_every_steps = checkpoint_every
    config.optimizer.lr = lr
    config.optimizer.warmup_steps = warmup


def one_degradation_per_image(config, classes) -> None:
    """PROD applies exactly one of `classes` to each training crop (all-in-one data)."""
    config.prod.ops = tuple(classes)
    config.prod.mode = "single"
    config.prod.min_degradations = 1
    config.prod.max_degradations = 1
