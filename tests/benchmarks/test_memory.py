"""benchmarks/memory.py and benchmarks/precision.py on the tiny backbone."""

import pytest
from flax import traverse_util

from benchmarks import memory, precision

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_largest_batch_follows_the_footprint_linear_in_pixels():
    gib = memory.GIB
    small = {"footprint": 1.0 * gib}  # batch 1 of 128x128
    large = {"footprint": 4.0 * gib}  # batch 4: 1 GiB per crop of 128x128
    fits = memory.largest_batches(small, large, 4, 128, sizes=[128, 256], budgets=[16, 24])
    # Fixed part 0 GiB, 1 GiB per 128x128 crop, 4 GiB per 256x256 crop.
    assert fits == {128: {16: 16, 24: 24}, 256: {16: 4, 24: 6}}


def test_remat_blocks_cuts_the_temporaries_of_the_step():
    plain = memory.analyse(memory.Row("nafnet-tiny", "full", "none", "float32"), 2, 64)
    remat = memory.analyse(memory.Row("nafnet-tiny", "full", "blocks", "float32"), 2, 64)
    assert 0 < remat["temp"] < 0.8 * plain["temp"]
    assert remat["arguments"] == plain["arguments"]  # the same state and batch
    assert plain["footprint"] == (
        plain["arguments"] + plain["outputs"] - plain["aliased"] + plain["temp"]
    )


def test_bfloat16_backbone_stays_within_2e_2_of_float32():
    row = precision.compare("nafnet-tiny", batch=1, size=32)
    assert row["output dtype"] == "float32"
    assert 0 < row["residual"] < 2e-2
    # Gradients through bf16 activations are rougher (7e-2 here); what matters for training is
    # where a bf16 fine-tune ends (the README's bf16 quickstart row).
    assert 0 < row["gradients"] < 0.2
    assert 0 < row["rounded kernels"] < 2e-2


def test_lora_dense_adapts_every_dense_conv_and_no_depthwise_one():
    def adapted(method):
        _, (state, _, _) = memory.build_step(
            memory.Row("nafnet-tiny", method, "none", "float32"), 1, 32
        )
        return {k[1:-1] for k in traverse_util.flatten_dict(state.trainable) if k[0] == "lora"}

    every_conv, dense = adapted("lora"), adapted("lora_dense")
    # NAFBlock's conv2 is the depthwise one; every other conv is dense.
    depthwise = {p for p in every_conv if p[-1] == "conv2"}
    assert depthwise and dense == every_conv - depthwise
