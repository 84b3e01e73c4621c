"""The backbones: official parameter counts, equality with the PyTorch originals, adapter hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ir_lora import models
from ir_lora.models.nafnet import NAFBlock, NAFStage
from ir_lora.models.restormer import FeedForward

# TORCH_KEYS.md: sums of all tensor sizes of the official PyTorch models.
OFFICIAL_PARAMETER_COUNTS = {
    "nafnet-sidd-w32": 29_159_715,
    "nafnet-sidd-w64": 115_982_915,
    "nafnet-gopro-w32": 17_111_907,
    "nafnet-gopro-w64": 67_888_835,
    "restormer": 26_126_644,
}
# BiasFree drops the bias of both LayerNorms of every TransformerBlock: blocks per level x width.
_RESTORMER_LN_BIASES = 2 * (
    4 * 48 + 6 * 96 + 6 * 192 + 8 * 384 + 6 * 192 + 6 * 96 + 4 * 96 + 4 * 96
)
OFFICIAL_PARAMETER_COUNTS["restormer-real-denoise"] = 26_126_644 - _RESTORMER_LN_BIASES


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", sorted(OFFICIAL_PARAMETER_COUNTS))
def test_official_parameter_counts(variant):
    assert _count(models.param_shapes(variant)) == OFFICIAL_PARAMETER_COUNTS[variant]


def test_variant_names():
    assert set(models.VARIANTS) == {
        "nafnet-sidd-w32",
        "nafnet-sidd-w64",
        "nafnet-gopro-w32",
        "nafnet-gopro-w64",
        "restormer",
        "restormer-real-denoise",
        "nafnet-tiny",
        "restormer-tiny",
    }


def test_build_errors_name_the_culprit():
    with pytest.raises(ValueError, match="nafnet-sidd-w32"):
        models.build("nafnet-sidd")
    with pytest.raises(ValueError, match="widht"):
        models.build("nafnet-tiny", widht=16)
    model = models.build("nafnet-tiny", width=4, enc_blk_nums=[1, 2, 1], dec_blk_nums=[1, 1, 1])
    assert (model.width, model.enc_blk_nums) == (4, (1, 2, 1))
    with pytest.raises(ValueError, match=r"\(1, 13, 19\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 13, 19)))


def _torch_model(variant, **overrides):
    torch = pytest.importorskip("torch")
    import torch_reference

    kwargs = {**models.VARIANTS[variant], **overrides}
    torch.manual_seed(0)
    if variant.startswith("nafnet"):
        net = torch_reference.NAFNet(**kwargs)
    else:
        kwargs["bias"] = kwargs.pop("use_bias")
        kwargs["LayerNorm_type"] = kwargs.pop("layer_norm_type")
        net = torch_reference.Restormer(**kwargs)
    # beta/gamma start at 0, temperatures and LayerNorm weights at 1: randomise them so the test
    # sees every parameter.
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(("beta", "gamma", "temperature")) or ".norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    return net.eval()


def test_nafnet_matches_pytorch():
    torch = pytest.importorskip("torch")
    net = _torch_model("nafnet-tiny")
    images = np.random.default_rng(0).random((2, 13, 19, 3), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    params = models.from_torch("nafnet-tiny", net.state_dict())
    got = jax.jit(models.build("nafnet-tiny").apply)({"params": params}, images)
    assert got.shape == images.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layer_norm_type,pad_mode", [("WithBias", "constant"), ("BiasFree", "reflect")]
)
def test_restormer_matches_pytorch(layer_norm_type, pad_mode):
    torch = pytest.importorskip("torch")
    # Two heads so the per-head split and temperatures are exercised; the original needs H, W
    # divisible by 8, so the torch side gets the same padding the flax model applies.
    overrides = dict(
        layer_norm_type=layer_norm_type,
        heads=(2, 2, 2, 2),
        use_bias=layer_norm_type == "WithBias",
    )

    net = _torch_model("restormer-tiny", **overrides)
    images = np.random.default_rng(1).random((1, 13, 19, 3), dtype=np.float32)
    with torch.no_grad():
        padded = torch.nn.functional.pad(
            torch.from_numpy(images.transpose(0, 3, 1, 2)), (0, 5, 0, 3), mode=pad_mode
        )
        expected = net(padded)[:, :, :13, :19].numpy().transpose(0, 2, 3, 1)
    params = models.from_torch("restormer-tiny", net.state_dict(), **overrides)
    model = models.build("restormer-tiny", pad_mode=pad_mode, **overrides)
    got = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_real_denoise_variant_is_bias_free():
    shapes = models.param_shapes("restormer-real-denoise")
    norm = shapes["encoder_level1"]["blocks_0"]["norm1"]
    assert set(norm) == {"scale"}


def _random_params(variant, seed=0):
    shapes = models.param_shapes(variant)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32) + 0.1, shapes)


def test_feed_forward_method_can_be_intercepted():
    """An adapter replacing NAFBlock.feed_forward by zero equals the model with gamma = 0."""
    model = models.build("nafnet-tiny")
    params = _random_params("nafnet-tiny")
    images = np.random.default_rng(1).random((1, 12, 16, 3), dtype=np.float32)
    apply = jax.jit(model.apply)
    seen = []

    def zero_ffn(next_fun, args, kwargs, context):
        if isinstance(context.module, NAFBlock) and context.method_name == "feed_forward":
            seen.append(context.module.path)
            return jnp.zeros_like(next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    # Interceptors act while jit traces, so they belong inside the jitted function.
    @jax.jit
    def apply_without_ffn(variables, images):
        with nn.intercept_methods(zero_ffn):
            return model.apply(variables, images)

    got = apply_without_ffn({"params": params}, images)
    no_gamma = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key == "gamma" else x, params
    )
    np.testing.assert_allclose(got, apply({"params": no_gamma}, images), atol=1e-6)
    assert sorted(seen) == [
        ("decoders_0", "blocks_0"),
        ("decoders_1", "blocks_0"),
        ("encoders_0", "blocks_0"),
        ("encoders_1", "blocks_0"),
        ("middle_blks", "blocks_0"),
    ]
    assert not np.allclose(got, apply({"params": params}, images))


def test_stages_and_ffn_are_submodules():
    nafnet_stages, restormer_ffns = [], []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, NAFStage) and context.method_name == "__call__":
            nafnet_stages.append(context.module.path)
        if isinstance(context.module, FeedForward) and context.method_name == "__call__":
            restormer_ffns.append(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for variant in ("nafnet-tiny", "restormer-tiny"):
            model = models.build(variant)
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert nafnet_stages == [
        ("encoders_0",),
        ("encoders_1",),
        ("middle_blks",),
        ("decoders_0",),
        ("decoders_1",),
    ]
    assert restormer_ffns[0] == ("encoder_level1", "blocks_0", "ffn")
    assert len(restormer_ffns) == 8  # one block in each of the 8 stages
