"""The benchmark suite's building blocks (tiny model, one step)."""

import argparse

import numpy as np

from benchmarks import common, suite


def test_adaptir_row_times_a_step_of_the_adapters_only():
    args = argparse.Namespace(batch=1, size=16, steps=1, rank=2)
    row = suite._train_row("nafnet-tiny", "adaptir", args)
    assert row["step_ms"] > 0 and row["compile_s"] > 0
    assert row["trainable_params"] == row["adapter_params"] > 0


def test_colora_ranks_match_the_uniform_budget():
    layers = {f"l{i}": (1, 1, 64, 64) for i in range(12)}
    ranks = common.colora_ranks(layers, rank=4)
    uniform = sum(common.adapter_size(s, 4) for s in layers.values())
    total = sum(common.adapter_size(layers[p], r) for p, r in ranks.items())
    assert abs(total - uniform) / uniform < 0.1
    values = list(ranks.values())
    assert values[0] > values[len(values) // 2] < values[-1]  # high at both ends
    np.testing.assert_array_less(0, values)
