"""CoLoRA: per-layer LoRA ranks from FAIG contributions (Park et al., ECCV 2024).

`contributions` measures what each layer contributes to a new task (FAIG, or gradient norms),
`ranks` turns the contributions into per-layer ranks under a parameter budget, `plot` draws them.
"""

from ir_lora.colora.contributions import (
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
from ir_lora.colora.ranks import (
    LayerRank,
    RankAllocation,
    adaptable_layers,
    allocate_ranks,
    uniform_rank_for_budget,
)

__all__ = [
    "BLOCK_PATTERN",
    "PARAM_GROUPS",
    "STAGES",
    "LayerRank",
    "LayerScores",
    "RankAllocation",
    "adaptable_layers",
    "allocate_ranks",
    "faig",
    "grad_norm",
    "layer_scores",
    "per_filter",
    "sum_squared_error",
    "uniform_rank_for_budget",
]
