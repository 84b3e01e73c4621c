"""The registry of stages: what `train.py` and `eval.py` run, selected by `config.stage`.

A stage is a pipeline from data to checkpoints to result tables. Each registers a `Stage` with
its `train(config, workdir)` and, where a finished run can be re-scored, its `evaluate(config, *,
workdir, checkpoint, datasets, out_dir)`; `train.py` and `eval.py` make one call each (`train`,
`evaluate`) and know no stage by name.

| stage | what it runs | module (`ir_lora.`) |
|---|---|---|
| `pretrain` | a backbone from scratch, PROD in the step | `stages.training` |
| `finetune` | `config.method` on a pre-trained backbone | `stages.training` |
| `colora_contributions` | CoLoRA's contributions, ranks and charts | `methods.colora.stages` |
| `colora` | CoLoRA's fine-tune, ranks first if missing | `methods.colora.stages` |
| `lora_ir_router` | LoRA-IR's degradation router | `methods.lora_ir.router_stage` |
| `lora_ir_allinone` | LoRA-IR's three stages, mixed test set | `methods.lora_ir.allinone` |
| `uir_lora` | UIR-LoRA: trained LoRAs composed per image | `methods.uir_lora.stage` |
| `quickstart` | the offline PROD + LoRA demonstration | `stages.quickstart` |
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from ir_lora import evaluator, preflight
from ir_lora import workdir as workdir_lib
from ir_lora.methods.colora import stages as colora_stages
from ir_lora.methods.lora_ir import allinone, router_stage
from ir_lora.methods.uir_lora import stage as uir_lora_stage
from ir_lora.stages import quickstart, training


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline `train.py` runs and, with `evaluate`, one `eval.py` re-scores.

    Attributes:
      train: `(config, workdir) -> result`.
      evaluate: `(config, *, workdir, checkpoint, datasets, out_dir) -> result`, or None when a
        finished run has nothing to re-score.
      summary: `evaluate`'s result -> the text `eval.py` prints (default: it is that text).
    """

    train: Callable[[Any, str], Any]
    evaluate: Callable[..., Any] | None = None
    summary: Callable[[Any], str] = str


def _results_table(results) -> str:
    return evaluator.format_table(results)


REGISTRY: dict[str, Stage] = {
    "pretrain": Stage(training.train_and_evaluate, training.evaluate, _results_table),
    "finetune": Stage(training.train_and_evaluate, training.evaluate, _results_table),
    "colora_contributions": Stage(colora_stages.contributions),
    "colora": Stage(colora_stages.finetune, colora_stages.evaluate, _results_table),
    "lora_ir_router": Stage(router_stage.train),
    "lora_ir_allinone": Stage(allinone.run, allinone.evaluate),
    "uir_lora": Stage(uir_lora_stage.train_and_evaluate, uir_lora_stage.evaluate, _results_table),
    "quickstart": Stage(quickstart.run, quickstart.evaluate),
}
STAGES = tuple(REGISTRY)

__all__ = ["REGISTRY", "STAGES", "Stage", "evaluate", "get", "train"]


def get(config) -> Stage:
    """The registered `Stage` of `config.stage`."""
    name = config.get("stage", None)
    if name not in REGISTRY:
        raise ValueError(f"config.stage={name!r} is not one of {STAGES}")
    return REGISTRY[name]


def train(config, workdir: str) -> Any:
    """Runs `config.stage` in `workdir` (resuming what it finds there).

    Before anything is written the config is checked (`preflight.check_run`), then the workdir
    is locked for the run (`workdir.lock`): a second run on it fails at once naming the holder.
    """
    stage = get(config)
    preflight.check_run(config)
    with workdir_lib.lock(workdir):
        return stage.train(config, workdir)


def evaluate(config, *, workdir=None, checkpoint=None, datasets=None, out_dir=None) -> str:
    """Re-scores a finished run of `config.stage`; returns the text `eval.py` prints."""
    stage = get(config)
    if workdir:
        preflight.require_workdir(workdir)  # a typo must not create a folder
    if stage.evaluate is None:
        raise ValueError(
            f"stage {config.stage!r} has nothing to evaluate; evaluable stages: "
            f"{[name for name, s in REGISTRY.items() if s.evaluate is not None]}"
        )
    results = stage.evaluate(
        config, workdir=workdir, checkpoint=checkpoint, datasets=datasets, out_dir=out_dir
    )
    return stage.summary(results)
