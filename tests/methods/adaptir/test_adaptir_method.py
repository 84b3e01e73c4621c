"""method = adaptir: AdaptIR beside the feed-forward paths of the real (tiny) backbones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ir_lora import methods, models
from ir_lora.methods import adaptir
from ir_lora.methods.adaptir import adapter as adaptir_lib
from ir_lora.models.nafnet import simple_gate
from ir_lora.peft import intercept

SHAPE = (2, 16, 16, 3)


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _images(shape=SHAPE, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def random_params(model, x, seed=1):
    """Random backbone params (a fresh NAFNet has gamma = beta = 0: its FFNs would be off)."""
    rng = np.random.default_rng(seed)
    shapes = intercept.eval_shape_init(model, x)["params"]
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def _build(model, shape=SHAPE):
    config = common.training_config("finetune", "adaptir")
    x = _images(shape)
    params = random_params(model, x)
    adaptation = methods.build(config, model, image_shape=shape)
    trainable, frozen = adaptation.method.init_fn(jax.random.key(0), params)
    return config, x, params, adaptation, trainable, frozen


def _bump_tails(tree, value=0.05):
    """Non-zero tails (and gates), so the adapters change the output."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + value if "tail" in jax.tree_util.keystr(path) else v, tree
    )


@pytest.mark.parametrize("variant", ["nafnet-tiny", "restormer-tiny"])
def test_identity_at_init_only_adapters_train_and_counts(variant):
    model = models.build(variant)
    config, x, params, adaptation, trainable, frozen = _build(model)
    assert set(trainable) == {"adaptir"} and set(frozen) == {"params"}
    apply = jax.jit(adaptation.method.apply_fn)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(apply(trainable, frozen, x), base, rtol=1e-5, atol=1e-5)
    # Non-zero tails: the adapters are really in the forward pass.
    assert float(jnp.abs(apply(_bump_tails(trainable), frozen, x) - base).max()) > 1e-3

    # One adapter per feed-forward path, each with the documented parameter count.
    flat = jax.tree_util.tree_flatten_with_path(trainable["adaptir"])[0]
    keys = [tuple(k.key for k in path) for path, _ in flat]
    adapters = {k[: k.index("adapter")] for k in keys}
    blocks = {
        path: cls
        for path, cls in intercept.module_paths(model, x).items()
        if cls == "NAFBlock" or (cls == "FeedForward" and path.endswith("ffn"))
    }
    assert {"/".join(a) for a in adapters} == set(blocks)
    # head kernel (1, 1, d, h): the block width d is shape[2].
    widths = [leaf.shape[2] for path, leaf in flat if "head" in str(path) and "kernel" in str(path)]
    expected = sum(
        adaptir_lib.param_count(d, adaptir.hidden_width(d, config.adaptir), reduction=4)
        for d in widths
    )
    assert sum(leaf.size for _, leaf in flat) == expected
    report = adaptation.report(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    )
    assert report.trainable == expected


def test_adapter_is_beside_the_nafblock_feed_forward():
    """Adapted block minus frozen block = gamma * AdaptIR(norm2(y)), y the block's first half."""
    model = models.NAFStage(features=8, num_blocks=1)
    config, x, params, adaptation, trainable, frozen = _build(model, (2, 8, 8, 8))
    trainable = _bump_tails(trainable)
    out = adaptation.method.apply_fn(trainable, frozen, x)
    block = params["blocks_0"]

    def first_half(m, inputs):
        h = simple_gate(m.conv2(m.conv1(m.norm1(inputs))))
        h = m.conv3(h * m.sca(jnp.mean(h, axis=(1, 2), keepdims=True)))
        return m.norm2(inputs + h * m.beta)

    normed = models.NAFBlock(8).apply({"params": block}, x, method=first_half)
    adapter = adaptir_lib.AdaptIR(
        features=8, hidden=adaptir.hidden_width(8, config.adaptir), reduction=4
    )
    side = adapter.apply({"params": trainable["adaptir"]["blocks_0"]["adapter"]}, normed)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(out - base, side * block["gamma"], atol=1e-5)


def test_batch_norm_is_refused():
    config = common.training_config("finetune", "adaptir")
    config.adaptir.norm = "batch"
    with pytest.raises(ValueError, match="adaptir.norm"):
        methods.build(config, models.build("nafnet-tiny"), image_shape=SHAPE)


def test_hidden_width_scales_with_the_block():
    """Default: the official IPT ratio (576 -> 24) with a floor of 2; `hidden` fixes it."""
    section = adaptir.default_config()
    assert [adaptir.hidden_width(d, section) for d in (16, 32, 64, 128, 576)] == [2, 2, 3, 5, 24]
    section.hidden = 6
    assert adaptir.hidden_width(128, section) == 6
    section.hidden, section.hidden_ratio = 0, 0.0
    with pytest.raises(ValueError, match="adaptir.hidden_ratio"):
        adaptir.hidden_width(16, section)
