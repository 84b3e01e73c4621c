"""Parameter counts of an adapted model: total, frozen, trainable, and the rank of every layer.

    rep = report.parameter_report({"params": params, "lora": factors}, labels)
    print(rep)  # markdown: totals, counts per label, one row per adapted layer

Per layer, `ratio` is CoLoRA's delta_i = r (d + k) / (d k) with d = Cout and k = kh*kw*Cin/g
(METHODS.md section 4): the adapter's size relative to the kernel it adapts.
"""

import dataclasses
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from ir_lora.peft import lora, partition


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One adapted layer: its path, kernel shape, rank and sizes."""

    path: str
    kernel_shape: tuple[int, ...]
    rank: int
    kernel_size: int
    adapter_size: int

    @property
    def ratio(self) -> float:
        """Adapter parameters per kernel parameter (CoLoRA's delta_i)."""
        return self.adapter_size / self.kernel_size


@dataclasses.dataclass(frozen=True)
class ParameterReport:
    """Parameter counts (numbers of scalars) of a variables tree and its labels.

    Attributes:
      total: all leaves of all collections.
      base: the `"params"` collection (the pre-trained network).
      adapter: the `"lora"` collection.
      trainable: leaves whose label is not "frozen".
      frozen: leaves labelled "frozen".
      by_label: count per label.
      layers: one row per adapted layer, in path order.
    """

    total: int
    base: int
    adapter: int
    trainable: int
    frozen: int
    by_label: Mapping[str, int]
    layers: tuple[LayerRow, ...]

    @property
    def trainable_percent(self) -> float:
        """Trainable scalars as a percentage of the base network's."""
        return 100.0 * self.trainable / max(self.base, 1)

    def to_markdown(self) -> str:
        """Totals, counts per label and the per-layer table as markdown text."""
        lines = [
            "| count | parameters |",
            "|---|---:|",
            f"| base network (params) | {self.base:,} |",
            f"| adapters (lora) | {self.adapter:,} |",
            f"| total | {self.total:,} |",
            f"| frozen | {self.frozen:,} |",
            f"| trainable | {self.trainable:,} ({self.trainable_percent:.3f}% of base) |",
        ]
        lines += [f"| label `{k}` | {v:,} |" for k, v in sorted(self.by_label.items())]
        if self.layers:
            lines += [
                "",
                "| layer | kernel | rank | kernel params | adapter params | ratio |",
                "|---|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {r.path} | {'x'.join(map(str, r.kernel_shape))} | {r.rank} | "
                f"{r.kernel_size:,} | {r.adapter_size:,} | {r.ratio:.4f} |"
                for r in self.layers
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def parameter_report(variables: Mapping, labels: Mapping) -> ParameterReport:
    """Counts for `variables` (`{"params": ..., "lora": ...}`) labelled by `labels`.

    Args:
      variables: nested dict of arrays or `jax.ShapeDtypeStruct` (shapes are enough).
      labels: `partition.label_tree(variables, rules)`.
    """
    flat = traverse_util.flatten_dict(variables, sep="/")
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    if flat.keys() != flat_labels.keys():
        raise ValueError("labels do not match variables; build them with partition.label_tree")
    size = {k: int(np.prod(v.shape)) for k, v in flat.items()}
    by_label: dict[str, int] = {}
    for k, label in flat_labels.items():
        by_label[label] = by_label.get(label, 0) + size[k]
    frozen = by_label.get(partition.FROZEN, 0)
    rows = []
    for path, rank in sorted(lora.ranks(variables.get(lora.COLLECTION, {})).items()):
        kernel = flat.get(f"params/{path}/kernel")
        if kernel is None:
            raise ValueError(f"LoRA layer {path!r} has no kernel 'params/{path}/kernel'")
        adapter = (
            size[f"{lora.COLLECTION}/{path}/{lora.DOWN}"]
            + size[f"{lora.COLLECTION}/{path}/{lora.UP}"]
        )
        rows.append(LayerRow(path, tuple(kernel.shape), rank, int(np.prod(kernel.shape)), adapter))
    total = sum(size.values())
    return ParameterReport(
        total=total,
        base=sum(v for k, v in size.items() if k.startswith("params/")),
        adapter=sum(v for k, v in size.items() if k.startswith(f"{lora.COLLECTION}/")),
        trainable=total - frozen,
        frozen=frozen,
        by_label=by_label,
        layers=tuple(rows),
    )
