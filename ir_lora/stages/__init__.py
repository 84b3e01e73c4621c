"""Stages: the pipelines `train.py` and `eval.py` run, selected by `config.stage`.

* `registry`: every stage by name (`registry.train(config, workdir)`, `registry.evaluate(...)`),
  the generic ones below and the methods' own (CoLoRA's contributions, LoRA-IR's router and
  all-in-one experiment, UIR-LoRA's composition, in their method packages).
* `training`: the `pretrain` and `finetune` stages.
* `quickstart`: the offline demonstration (PROD pre-training, then LoRA on haze).

The package imports none of them itself: the methods' stage modules build on `training`, and
the registry imports those, so importing the registry here would make a cycle.
"""

__all__ = ["quickstart", "registry", "training"]
