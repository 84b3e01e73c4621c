"""Charts of contributions per block and ranks per layer (PNG, matplotlib's Agg backend).

`plot_block_contributions` draws the CoLoRA paper's real_fig3 view: one bar per block of the
U-Net in forward order, coloured by stage (encoder / middle / decoder).
"""

import os
import re
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from flax import linen as nn  # noqa: E402

from ir_lora.methods.colora.contributions import LayerScores  # noqa: E402
from ir_lora.methods.colora.ranks import RankAllocation  # noqa: E402

STAGE_COLOURS: Mapping[str, str] = {
    "encoder": "tab:blue",
    "middle": "tab:gray",
    "decoder": "tab:orange",
    "other": "tab:green",
}


_STAGE_ORDER = ("encoder", "middle", "decoder")


def call_order(model: nn.Module, *args, **kwargs) -> list[str]:
    """ "/"-joined paths of the submodules of `model` in the order they are first called.

    Traced with `jax.eval_shape` (nothing is computed); the `order` for the charts.
    """
    paths: list[str] = []

    def record(next_fun, call_args, call_kwargs, context):
        path = "/".join(context.module.path)
        if path and path not in paths:
            paths.append(path)
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return paths


def forward_order(
    names: Sequence[str], stage_of: Mapping[str, str], order: Sequence[str] | None = None
) -> list[str]:
    """Blocks or layers in forward order.

    Params trees come back with sorted keys, so the forward order is lost. With `order` (module
    paths in call order, e.g. the keys of `ir_lora.peft.intercept.module_paths(model, x)`) a name
    sorts by the first path equal to it or under it; otherwise by stage (encoder, middle,
    decoder, other), then naturally (blocks_2 before blocks_10) within a stage.
    """

    def natural(name):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    def stage_key(name):
        stage = stage_of.get(name, "other")
        rank = _STAGE_ORDER.index(stage) if stage in _STAGE_ORDER else len(_STAGE_ORDER)
        return (rank, natural(name))

    if order is None:
        return sorted(names, key=stage_key)
    position = {}
    for i, path in enumerate(order):
        for name in names:
            if name not in position and (path == name or path.startswith(name + "/")):
                position[name] = i
    return sorted(names, key=lambda n: (position.get(n, len(order)), stage_key(n)))


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _legend(ax, stages):
    handles = [plt.Rectangle((0, 0), 1, 1, color=STAGE_COLOURS.get(s, "black")) for s in stages]
    ax.legend(handles, stages, loc="best")


def plot_block_contributions(
    scores: LayerScores,
    path: str,
    *,
    order: Sequence[str] | None = None,
    title: str = "Contribution per block",
    log: bool = False,
) -> str:
    """Bar chart of `scores.blocks`, coloured by stage, written to `path` (PNG).

    Args:
      scores: `layer_scores` output.
      path: the PNG file to write (folders are created).
      order: module paths in forward order, see `forward_order`.
      title: the chart title.
      log: log-scale y axis (middle blocks can be orders of magnitude below the ends).

    Returns:
      `path`.
    """
    names = forward_order(list(scores.blocks), scores.block_stage, order)
    if not names:
        raise ValueError("plot_block_contributions: scores has no blocks")
    stages = [scores.block_stage.get(n, "other") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4.0))
    colours = [STAGE_COLOURS.get(s, "black") for s in stages]
    ax.bar(range(len(names)), [scores.blocks[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("contribution (FAIG)")
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    _legend(ax, list(dict.fromkeys(stages)))
    return _save(fig, path)


def plot_ranks(
    allocation: RankAllocation,
    path: str,
    *,
    layer_stage: Mapping[str, str] | None = None,
    order: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Bar chart of the rank of every layer, in the allocation's order, written to `path` (PNG).

    Args:
      allocation: `allocate_ranks` or `uniform_rank_for_budget` output.
      path: the PNG file to write (folders are created).
      layer_stage: module path -> stage for colours and order (`layer_stages`); default one
        colour.
      order: module paths in forward order, see `forward_order`.
      title: the chart title; default the rule and the trainable share.

    Returns:
      `path`.
    """
    by_path = {r.path: r for r in allocation.rows}
    rows = [by_path[p] for p in forward_order(list(by_path), layer_stage or {}, order)]
    stages = [(layer_stage or {}).get(r.path, "other") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows)), 4.0))
    ax.bar(
        range(len(rows)),
        [r.rank for r in rows],
        color=[STAGE_COLOURS.get(s, "black") for s in stages],
    )
    ax.set_xticks(range(len(rows)), [r.path for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("LoRA rank")
    share = 100.0 * allocation.trainable_params / allocation.backbone_params
    ax.set_title(title or f"{allocation.rule} ranks: {share:.2f}% trainable")
    if layer_stage:
        _legend(ax, list(dict.fromkeys(stages)))
    return _save(fig, path)


def layer_stages(scores: LayerScores) -> dict[str, str]:
    """Module path -> stage of every scored layer, from the stage of the layer's block."""
    out = {}
    for layer in scores.layers:
        block = next(
            (b for b in scores.block_stage if layer == b or layer.startswith(b + "/")), None
        )
        out[layer] = scores.block_stage.get(block, "other") if block else "other"
    return out
