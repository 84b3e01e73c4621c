"""CoLoRA (Park et al., ECCV 2024): LoRA with per-layer ranks from each layer's contribution.

`contributions` measures what each layer contributes to a new task (FAIG, or gradient norms),
`ranks` turns the contributions into per-layer ranks under a parameter budget
(`budget_fraction`, ~7% for NAFNet in the paper), `plot` draws them and `files` reads and writes
them. The method (config section `colora`) is LoRA with one exact-path target per layer of a
ranks file (`colora.ranks`): a layer with rank 0, or absent from the file, gets no adapter.
Biases and norms train too with `tune_bias_norm` (the allocation counted them against the
budget, so the setting must match the file's). Everything else is frozen and the checkpoints
hold only the trainable tree, as for `lora`.

Its stages (`stages`): `colora_contributions` writes the contributions, ranks and charts into a
workdir; `colora` fine-tunes, computing them first into `<workdir>/colora/` when `colora.ranks`
is empty.
"""

import ml_collections
from flax import linen as nn

from ir_lora.methods import lora
from ir_lora.methods.base import MethodSpec, Parts
from ir_lora.methods.colora import files
from ir_lora.methods.colora.contributions import (
    BLOCK_PATTERN,
    PARAM_GROUPS,
    STAGES,
    LayerScores,
    faig,
    grad_norm,
    layer_scores,
    per_filter,
    sum_squared_error,
)
from ir_lora.methods.colora.ranks import (
    LayerRank,
    RankAllocation,
    adaptable_layers,
    allocate_ranks,
    uniform_rank_for_budget,
)
from ir_lora.peft import lora as lora_lib

__all__ = [
    "BLOCK_PATTERN",
    "PARAM_GROUPS",
    "SPEC",
    "STAGES",
    "LayerRank",
    "LayerScores",
    "RankAllocation",
    "adaptable_layers",
    "allocate_ranks",
    "default_config",
    "faig",
    "grad_norm",
    "layer_scores",
    "lora_config",
    "per_filter",
    "sum_squared_error",
    "uniform_rank_for_budget",
]


def default_config() -> ml_collections.ConfigDict:
    """The `colora` section (configs/colora.py documents each key; [R] defaults: METHODS.md).

    `ranks`: a ranks JSON written by the contributions stage (empty: the `colora` stage computes
    it first). Contributions: `contribution` "faig" (needs a brief full fine-tune of
    `probe_steps` at `probe_lr`; FAIG with `faig_steps` Riemann steps, `per_image` as the
    official code) or "grad_norm" (no fine-tune), over `num_batches` training batches, reduced
    per layer by `reduce`/`filter`. Ranks: `rule` "delta" | "proportional" under
    `budget_fraction` of the backbone, with `normalize`, `beta`, `delta_min`, `r_min`,
    `tolerance` (`allocate_ranks`). Adapters: `alpha` (0: scale 1), `tune_bias_norm`,
    `also_train` as for `lora`.
    """
    return ml_collections.ConfigDict(
        {
            "ranks": "",
            "budget_fraction": 0.07,
            "contribution": "faig",
            "probe_steps": 200,
            "probe_lr": 2e-4,
            "faig_steps": 20,
            "per_image": True,
            "num_batches": 2,
            "reduce": "mean_filter",
            "filter": "output",
            "rule": "delta",
            "normalize": "max",
            "beta": 0.0,
            "delta_min": 0.0,
            "r_min": 0,
            "tolerance": 0.01,
            "alpha": 0.0,
            "tune_bias_norm": True,
            "also_train": (),
        }
    )


def lora_config(section) -> lora_lib.LoraConfig:
    """`LoraConfig` with one exact-path target per layer of the section's ranks file."""
    path = section.get("ranks", "")
    if not path:
        raise ValueError(
            "method='colora' needs config.colora.ranks (a ranks JSON written by the "
            "colora_contributions stage); the colora stage (configs/colora.py) computes it "
            "first when it is empty"
        )
    payload = files.read_ranks_file(path)
    if bool(payload.get("tune_bias_norm", True)) != bool(section.tune_bias_norm):
        raise ValueError(
            f"CoLoRA ranks file {path!r} was allocated with tune_bias_norm="
            f"{payload.get('tune_bias_norm')} but config.colora.tune_bias_norm="
            f"{section.tune_bias_norm}: the budget would not mean the same; set them equal"
        )
    alpha = section.get("alpha")
    return lora_lib.LoraConfig(
        targets=lora_lib.targets_from_ranks(payload["ranks"]),
        alpha=float(alpha) if alpha else None,
    )


def parts(config, model: nn.Module, sample) -> Parts:
    return lora.parts_for(lora_config(config.colora), config.colora, model, sample)


SPEC = MethodSpec(parts=parts, sections={"colora": default_config})
