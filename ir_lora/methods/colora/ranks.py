"""From per-layer contributions to per-layer LoRA ranks under a trainable-parameter budget.

For an adaptable layer i with kernel `(..., d_i)` (HWIO conv `(kh, kw, Cin/g, Cout)` or Dense
`(in, out)`), `k_i = prod(kernel.shape[:-1])`, `d_i = Cout`; a rank-r LoRA has `r (k_i + d_i)`
parameters, and the rank whose LoRA is as large as the layer itself is `d_i k_i / (d_i + k_i)`.
The CoLoRA rule (METHODS.md 5.2, a reconstruction: the paper's exact formula is unknown):

    c_hat_i = c_i / max_j c_j            (normalize="max")  or min-max (normalize="minmax")
    delta_i = clip(alpha * c_hat_i + beta, delta_min, 1)
    r_i     = max(r_min, round(delta_i * d_i k_i / (d_i + k_i)))

with beta fixed and alpha found by bisection so that the trainable total, the LoRA factors plus
(with `tune_bias_norm`) every non-kernel parameter tuned directly, meets the budget (7% of the
backbone by default) within `tolerance`. The "proportional" rule `r_i = round(r_max c_hat_i)`
bisects r_max instead. Everything is float64 numpy on the host and deterministic.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class LayerRank:
    """One row of the allocation report."""

    path: str
    shape: tuple[int, ...]
    score: float
    c_hat: float
    delta: float
    rank: int
    lora_params: int
    layer_params: int


@dataclasses.dataclass(frozen=True)
class RankAllocation:
    """Per-layer ranks and the budget they meet.

    Attributes:
      targets: ordered `(regex, rank)` pairs, one exact anchored path per scored layer (rank 0
        included: no adapter), for `ir_lora.peft.lora.LoraConfig(targets=...)`.
      rows: the per-layer report, in the order of the scores.
      rule: "delta", "proportional" or "uniform".
      knob: the value found by the search (alpha, r_max or the uniform rank).
      backbone_params: parameters of the whole backbone.
      budget_params: the target number of trainable parameters.
      lora_params: parameters of all LoRA factors.
      direct_params: non-kernel parameters tuned directly (0 without `tune_bias_norm`).
    """

    targets: tuple[tuple[str, int], ...]
    rows: tuple[LayerRank, ...]
    rule: str
    knob: float
    backbone_params: int
    budget_params: int
    lora_params: int
    direct_params: int

    @property
    def trainable_params(self) -> int:
        return self.lora_params + self.direct_params

    @property
    def ranks(self) -> dict[str, int]:
        return {row.path: row.rank for row in self.rows}

    def table(self) -> str:
        """The report as a fixed-width text table with a totals line."""
        width = max([len("layer")] + [len(r.path) for r in self.rows])
        lines = [
            f"{'layer':<{width}}  {'shape':<18} {'c_i':>10} {'c_hat':>6} {'delta':>6} "
            f"{'rank':>5} {'#lora':>9} {'#layer':>9}"
        ]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            lines.append(
                f"{r.path:<{width}}  {shape:<18} {r.score:>10.3e} {r.c_hat:>6.3f} "
                f"{r.delta:>6.3f} {r.rank:>5d} {r.lora_params:>9d} {r.layer_params:>9d}"
            )
        share = 100.0 * self.trainable_params / self.backbone_params
        lines.append(
            f"rule={self.rule} knob={self.knob:.6g}: LoRA {self.lora_params} + direct "
            f"{self.direct_params} = {self.trainable_params} trainable of {self.backbone_params} "
            f"({share:.2f}%; budget {self.budget_params})"
        )
        return "\n".join(lines)


def adaptable_layers(params) -> dict[str, tuple[int, ...]]:
    """Module path -> kernel shape of every `kernel` leaf of rank >= 2, in the params' order.

    Works on arrays and on `jax.ShapeDtypeStruct`s (`jax.eval_shape` of an init).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    return {
        path.rsplit("/", 1)[0]: tuple(int(n) for n in x.shape)
        for path, x in flat.items()
        if path.rsplit("/", 1)[-1] == "kernel" and len(x.shape) >= 2
    }


def _sizes(params) -> tuple[int, int]:
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    kernels = sum(math.prod(s) for s in adaptable_layers(params).values())
    return total, total - kernels


def _check_budget(budget_fraction: float, budget_params: int | None) -> None:
    if budget_params is None and not budget_fraction > 0:
        raise ValueError(f"budget_fraction must be > 0, got {budget_fraction}")
    if budget_params is not None and budget_params <= 0:
        raise ValueError(f"budget_params must be > 0, got {budget_params}")


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def _normalize(scores: np.ndarray, normalize: str) -> np.ndarray:
    if np.any(~np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("contribution scores must be finite and >= 0")
    if normalize == "max":
        if scores.max() <= 0:
            raise ValueError("all contribution scores are 0: nothing to normalise by")
        return scores / scores.max()
    if normalize == "minmax":
        span = scores.max() - scores.min()
        return np.ones_like(scores) if span <= 0 else (scores - scores.min()) / span
    raise ValueError(f"normalize must be 'max' or 'minmax', got {normalize!r}")


def _search(total_of: Callable[[float], int], budget: int, knob_max: float) -> float:
    """The knob in [0, knob_max] whose (non-decreasing, stepwise) total is closest to budget."""
    lo, hi = 0.0, knob_max
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total_of(mid) < budget:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda k: (abs(total_of(k) - budget), k))


def allocate_ranks(
    scores: Mapping[str, float],
    params,
    *,
    budget_fraction: float = 0.07,
    budget_params: int | None = None,
    rule: str = "delta",
    normalize: str = "max",
    beta: float = 0.0,
    delta_min: float = 0.0,
    r_min: int = 0,
    tune_bias_norm: bool = True,
    tolerance: float = 0.01,
) -> RankAllocation:
    """Per-layer LoRA ranks from contributions, meeting a trainable-parameter budget.

    Args:
      scores: module path -> contribution c_i (`layer_scores(...).layers`). Every path must be
        an adaptable layer of `params`; layers without a score get no adapter.
      params: the backbone params (arrays or `jax.ShapeDtypeStruct`s).
      budget_fraction: the budget as a fraction of the backbone's parameters (paper: ~7%).
      budget_params: the budget in parameters; overrides `budget_fraction`.
      rule: "delta" (the CoLoRA rule, bisects alpha) or "proportional" (bisects r_max).
      normalize: "max" or "minmax" normalisation of the scores to c_hat.
      beta: delta floor added to every layer ("delta" rule).
      delta_min: lower clip of delta ("delta" rule).
      r_min: lower bound of every rank (0 allows layers without adapter).
      tune_bias_norm: count every non-kernel parameter (biases, norms, variables) as trainable.
      tolerance: relative distance to the budget that is accepted.

    Returns:
      A `RankAllocation`.

    Raises:
      ValueError: on unknown layers, bad options, or a budget no allocation meets within
        `tolerance` (below the floor, above the maximum, or between two rank steps).
    """
    if rule not in ("delta", "proportional"):
        raise ValueError(f"rule must be 'delta' or 'proportional', got {rule!r}")
    if not (0.0 <= delta_min <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta and delta_min must lie in [0, 1], got {beta=}, {delta_min=}")
    if r_min < 0 or tolerance <= 0:
        raise ValueError(f"r_min must be >= 0 and tolerance > 0, got {r_min=}, {tolerance=}")
    _check_budget(budget_fraction, budget_params)
    layers = adaptable_layers(params)
    unknown = [p for p in scores if p not in layers]
    if unknown:
        raise ValueError(
            f"scores name layers that are not adaptable kernels of params: {unknown[:5]} "
            f"(adaptable: {list(layers)[:5]}...)"
        )
    if not scores:
        raise ValueError("allocate_ranks needs at least one scored layer")
    paths = list(scores)
    shapes = [layers[p] for p in paths]
    c = np.array([float(scores[p]) for p in paths], np.float64)
    c_hat = _normalize(c, normalize)
    d = np.array([s[-1] for s in shapes], np.float64)
    k = np.array([math.prod(s[:-1]) for s in shapes], np.float64)
    full = d * k / (d + k)  # the rank of a LoRA as large as the layer
    cap = np.maximum(_round_half_up(full), r_min)
    backbone, non_kernel = _sizes(params)
    direct = non_kernel if tune_bias_norm else 0
    budget = int(round(budget_fraction * backbone)) if budget_params is None else budget_params

    def deltas(alpha):
        return np.clip(alpha * c_hat + beta, delta_min, 1.0)

    if rule == "delta":
        ranks_of = lambda alpha: np.maximum(_round_half_up(deltas(alpha) * full), r_min)
        knob_max = 1.0
        while np.any((deltas(knob_max) < 1.0) & (c_hat > 0)):
            knob_max *= 2.0
    else:
        ranks_of = lambda r_max: np.clip(_round_half_up(r_max * c_hat), r_min, cap)
        knob_max = float(cap.max() / c_hat[c_hat > 0].min())
    total_of = lambda knob: int((ranks_of(knob) * (d + k)).sum()) + direct

    low, high = total_of(0.0), total_of(knob_max)
    what = "bias/norm params tuned directly" if tune_bias_norm else "nothing tuned directly"
    if budget < low * (1 - tolerance):
        raise ValueError(
            f"budget {budget} params is below the floor {low} ({what}: {direct}; LoRA at the "
            f"smallest ranks: {low - direct}); raise the budget, lower beta/delta_min/r_min, or "
            "set tune_bias_norm=False"
        )
    if budget > high * (1 + tolerance):
        raise ValueError(
            f"budget {budget} params is above the maximum {high} ({what}: {direct}; every scored "
            f"layer at full-size LoRA: {high - direct}); lower the budget"
        )
    knob = _search(total_of, budget, knob_max)
    reached = total_of(knob)
    if abs(reached - budget) > tolerance * budget:
        raise ValueError(
            f"no {rule!r} allocation meets the budget {budget} within {tolerance:.1%}: the "
            f"closest reaches {reached} (ranks move in steps of d_i + k_i params); change "
            "beta, the rule, or the tolerance"
        )
    ranks = ranks_of(knob)
    delta = deltas(knob) if rule == "delta" else ranks / full
    return _allocation(paths, shapes, c, c_hat, delta, ranks, rule, knob, backbone, budget, direct)


def _allocation(paths, shapes, c, c_hat, delta, ranks, rule, knob, backbone, budget, direct):
    rows = tuple(
        LayerRank(
            path=p,
            shape=s,
            score=float(ci),
            c_hat=float(ch),
            delta=float(de),
            rank=int(r),
            lora_params=int(r) * (s[-1] + math.prod(s[:-1])),
            layer_params=math.prod(s),
        )
        for p, s, ci, ch, de, r in zip(paths, shapes, c, c_hat, delta, ranks)
    )
    return RankAllocation(
        targets=tuple((f"^{re.escape(row.path)}$", row.rank) for row in rows),
        rows=rows,
        rule=rule,
        knob=float(knob),
        backbone_params=int(backbone),
        budget_params=int(budget),
        lora_params=sum(row.lora_params for row in rows),
        direct_params=int(direct),
    )


def uniform_rank_for_budget(
    params,
    *,
    layers: list[str] | None = None,
    budget_fraction: float = 0.07,
    budget_params: int | None = None,
    tune_bias_norm: bool = True,
) -> RankAllocation:
    """The plain-LoRA baseline: one rank for every layer, as close to the budget as it gets.

    Each layer's rank is capped at its full-size rank `round(d k / (d + k))`. No tolerance is
    enforced (one rank step moves every layer at once); compare `trainable_params` with the
    CoLoRA allocation's, e.g. by passing `budget_params=colora.trainable_params`.

    Args:
      params: the backbone params (arrays or `jax.ShapeDtypeStruct`s).
      layers: module paths to adapt; default every adaptable layer.
      budget_fraction: the budget as a fraction of the backbone's parameters.
      budget_params: the budget in parameters; overrides `budget_fraction`.
      tune_bias_norm: count every non-kernel parameter as trainable.

    Returns:
      A `RankAllocation` with rule "uniform" and `knob` the rank (c_i and c_hat set to 1).
    """
    _check_budget(budget_fraction, budget_params)
    all_layers = adaptable_layers(params)
    paths = list(all_layers) if layers is None else list(layers)
    unknown = [p for p in paths if p not in all_layers]
    if unknown or not paths:
        raise ValueError(f"layers must be adaptable kernels of params; unknown: {unknown[:5]}")
    shapes = [all_layers[p] for p in paths]
    d = np.array([s[-1] for s in shapes], np.float64)
    k = np.array([math.prod(s[:-1]) for s in shapes], np.float64)
    full = d * k / (d + k)
    cap = _round_half_up(full)
    backbone, non_kernel = _sizes(params)
    direct = non_kernel if tune_bias_norm else 0
    budget = int(round(budget_fraction * backbone)) if budget_params is None else budget_params
    totals = [int((np.minimum(r, cap) * (d + k)).sum()) + direct for r in range(cap.max() + 1)]
    rank = min(range(len(totals)), key=lambda r: (abs(totals[r] - budget), r))
    ranks = np.minimum(rank, cap)
    ones = np.ones(len(paths))
    return _allocation(
        paths, shapes, ones, ones, ranks / full, ranks, "uniform", rank, backbone, budget, direct
    )
