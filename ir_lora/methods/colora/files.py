"""The JSON files of a CoLoRA run: contributions, and the per-layer ranks `method=colora` reads.

A ranks file is the contract between the `contributions` stage and the `colora` method:

    {"format": "ir_lora.colora.ranks/1", "rule": "delta", "ranks": {"intro": 3, ...},
     "backbone_params": ..., "budget_params": ..., "lora_params": ..., "direct_params": ...,
     "trainable_params": ..., "tune_bias_norm": true, "model": {...}, "layers": [row, ...]}

`ranks` maps module paths to LoRA ranks (0: no adapter); layers absent from it get none either.
Any `RankAllocation` can be written, so the equal-budget uniform-rank baseline is a ranks file too.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from ir_lora.methods.colora.contributions import LayerScores
from ir_lora.methods.colora.ranks import RankAllocation

RANKS_FORMAT = "ir_lora.colora.ranks/1"
CONTRIBUTIONS_FORMAT = "ir_lora.colora.contributions/1"


def _write_json(path: str, payload: Mapping[str, Any]) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return path


def save_allocation(
    allocation: RankAllocation,
    path: str,
    *,
    tune_bias_norm: bool,
    model: Mapping[str, Any] | None = None,
) -> str:
    """Writes `allocation` as a ranks file (see the module docstring) and returns its path.

    Args:
      allocation: `allocate_ranks` or `uniform_rank_for_budget` output.
      path: the JSON file to write (folders are created).
      tune_bias_norm: whether the allocation counted biases and norms as trainable; the
        `colora` method checks it against its own setting so that the budget means the same.
      model: the backbone's description (variant, overrides), recorded for the reader.
    """
    payload = {
        "format": RANKS_FORMAT,
        "rule": allocation.rule,
        "knob": allocation.knob,
        "ranks": allocation.ranks,
        "backbone_params": allocation.backbone_params,
        "budget_params": allocation.budget_params,
        "lora_params": allocation.lora_params,
        "direct_params": allocation.direct_params,
        "trainable_params": allocation.trainable_params,
        "tune_bias_norm": bool(tune_bias_norm),
        "model": dict(model or {}),
        "layers": [dataclasses.asdict(row) for row in allocation.rows],
    }
    return _write_json(path, payload)


def read_ranks_file(path: str) -> dict[str, Any]:
    """The parsed ranks file at `path`, validated.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a ranks file, or a rank that is not a non-negative integer (named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CoLoRA ranks file {path!r} does not exist: write one with the contributions stage "
            "(python train.py --config configs/colora.py:contributions --workdir DIR) or leave "
            "config.colora.ranks empty to compute it at the start of the run"
        )
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"CoLoRA ranks file {path!r} is not valid JSON: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != RANKS_FORMAT:
        raise ValueError(
            f'{path!r} is not a CoLoRA ranks file (expected "format": {RANKS_FORMAT!r})'
        )
    ranks = payload.get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError(f'CoLoRA ranks file {path!r}: "ranks" must be a non-empty object')
    for layer, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(
                f"CoLoRA ranks file {path!r}: rank of layer {layer!r} must be an integer >= 0, "
                f"got {rank!r}"
            )
    if not any(ranks.values()):
        raise ValueError(f"CoLoRA ranks file {path!r}: every rank is 0, nothing to adapt")
    return payload


def load_ranks(path: str) -> dict[str, int]:
    """`{module path: rank}` from a ranks file (see `read_ranks_file` for the checks)."""
    return dict(read_ranks_file(path)["ranks"])


def scores_to_json(scores: LayerScores, *, contribution: str) -> dict[str, Any]:
    """The contributions of a `LayerScores` as a JSON-able dict."""
    return {
        "format": CONTRIBUTIONS_FORMAT,
        "contribution": contribution,
        "layers": scores.layers,
        "groups": scores.groups,
        "blocks": scores.blocks,
        "stages": scores.stages,
        "block_stage": scores.block_stage,
        "leaves": scores.leaves,
    }


def save_scores(scores: LayerScores, path: str, *, contribution: str, **extra) -> str:
    """Writes the contributions JSON (plus `extra` entries) and returns its path."""
    return _write_json(path, {**scores_to_json(scores, contribution=contribution), **extra})


def load_scores(path: str) -> LayerScores:
    """A `LayerScores` back from a contributions JSON written by `save_scores`."""
    with open(path) as f:
        payload = json.load(f)
    if payload.get("format") != CONTRIBUTIONS_FORMAT:
        raise ValueError(f"{path!r} is not a CoLoRA contributions file")
    fields = ("layers", "leaves", "groups", "blocks", "stages", "block_stage")
    return LayerScores(**{name: dict(payload[name]) for name in fields})
