"""What the stages are made of: backbones, a config's method, its data and its evaluation.

The services sit below the stages (`ir_lora.stages`, the method packages' stage modules) and
above the library (models, methods, trainer, data, evaluator), so nothing below imports what is
above:

* `backbones`: build `config.model`, load pre-trained params (export dir, workdir, `.pth`),
  export params.
* `adaptation`: the config's method on its backbone (PROD in the step when asked), its frozen
  inputs and references, restoring a trained workdir, the inference function.
* `inputs`: this process's training iterator and the evaluation sets.
* `evaluation`: the evaluator with the config's settings.
"""

from ir_lora.services.adaptation import (
    build_adaptation,
    frozen_inputs,
    inference,
    reference_paths,
    restore_trained,
    with_recorded_references,
)
from ir_lora.services.backbones import (
    EXPORT_DIR,
    EXPORT_VARIABLES_DIR,
    backbone_source,
    build_model,
    export_params,
    load_backbone,
    load_params,
)
from ir_lora.services.evaluation import run_evaluation
from ir_lora.services.inputs import data_dir, eval_datasets, train_iterator

__all__ = [
    "EXPORT_DIR",
    "EXPORT_VARIABLES_DIR",
    "backbone_source",
    "build_adaptation",
    "build_model",
    "data_dir",
    "eval_datasets",
    "export_params",
    "frozen_inputs",
    "inference",
    "load_backbone",
    "load_params",
    "reference_paths",
    "restore_trained",
    "run_evaluation",
    "train_iterator",
    "with_recorded_references",
]
