"""LoRA attached from outside to models that know nothing of ir_lora."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax import lax

from ir_lora.models import layers
from ir_lora.peft import intercept, lora
from ir_lora.peft.lora import LoraConfig

# The layer kinds under test: path -> (description). Shapes below are tiny on purpose.
KINDS = {
    "stem": "plain 3x3",
    "body/point": "1x1",
    "body/down": "strided 2x2",
    "body/dilated": "dilated 3x3",
    "body/grouped": "grouped g=2",
    "body/depthwise": "depthwise 3x3",
    "head": "Dense",
}


pytestmark = pytest.mark.usefixtures("fast_compilation")


class Body(nn.Module):
    """A plain conv stack, written as if by someone who never heard of LoRA."""

    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (1, 1), name="point")(x))
        x = nn.Conv(2 * self.width, (2, 2), strides=2, padding="VALID", name="down")(x)
        x = nn.gelu(nn.Conv(2 * self.width, (3, 3), kernel_dilation=2, name="dilated")(x))
        x = nn.Conv(2 * self.width, (3, 3), feature_group_count=2, name="grouped")(x)
        x = nn.Conv(2 * self.width, (3, 3), feature_group_count=2 * self.width, name="depthwise")(x)
        gain = self.param("gain", nn.initializers.ones, (1,))  # a container's own parameter
        return gain * nn.LayerNorm(name="norm")(x)


class Net(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), name="stem")(x)
        x = Body(self.width, name="body")(x)
        x = jnp.mean(x, axis=(1, 2)) if not train else jnp.max(x, axis=(1, 2))
        return nn.Dense(3, name="head")(x)


class FastNet(nn.Module):
    """The project's fast `layers.Conv` (1x1 as matmul, depthwise as shifted adds)."""

    @nn.compact
    def __call__(self, x):
        x = layers.Conv(6, (1, 1), name="point")(x)
        x = layers.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(x)
        return layers.Conv(3, (3, 3), name="plain")(x)


def _params(model, *args):
    """Random params from the shapes only (numpy: no per-shape XLA compilation of initialisers)."""
    shapes = intercept.eval_shape_init(model, *args)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def _x(shape=(2, 8, 8, 3), seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _all_layers(rank=2):
    return LoraConfig(targets=((".*norm", 0), ("stem|head|body/.*", rank)))


def _randomise_up(lora_tree, seed=7):
    """Nonzero B factors so that the adapters change the output."""
    rng = np.random.default_rng(seed)
    out = {
        n: (jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype) if n[-1] == lora.UP else v)
        for n, v in sorted(traverse_util.flatten_dict(lora_tree).items())
    }
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def net_setup():
    model, x = Net(), _x()
    params = _params(model, x)
    config = _all_layers()
    factors = lora.init_lora(model, config, jax.random.key(3), x)
    return model, x, params, config, factors


def test_factor_shapes_and_ranks(net_setup):
    _, _, params, _, factors = net_setup
    assert set(lora.ranks(factors)) == set(KINDS)
    for path in KINDS:
        node_p = params
        node_l = factors
        for name in path.split("/"):
            node_p, node_l = node_p[name], node_l[name]
        kernel = node_p["kernel"]
        assert node_l["lora_a"].shape == (int(np.prod(kernel.shape[:-1])), 2), path
        assert node_l["lora_b"].shape == (2, kernel.shape[-1]), path
        np.testing.assert_array_equal(node_l["lora_b"], 0)
        bound = 1 / np.sqrt(node_l["lora_a"].shape[0])
        assert np.abs(node_l["lora_a"]).max() <= bound, path


def test_zero_init_is_identity_bit_for_bit(net_setup):
    model, x, params, config, factors = net_setup
    base = model.apply({"params": params}, x)
    adapted = lora.apply(model, params, factors, config, x)
    np.testing.assert_array_equal(adapted, base)


def test_down_factors_differ_between_layers_and_follow_the_key(net_setup):
    model, x, _, config, factors = net_setup
    downs = {p: np.asarray(v) for p, v in _downs(factors).items()}
    # Same-shaped factors (grouped and depthwise share none here, so compare leading entries).
    firsts = [tuple(v.ravel()[:2]) for v in downs.values()]
    assert len(set(firsts)) == len(firsts)
    again = lora.init_lora(model, config, jax.random.key(3), x)
    other = lora.init_lora(model, config, jax.random.key(4), x)
    for path, v in _downs(again).items():
        np.testing.assert_array_equal(v, downs[path])
        assert not np.allclose(_downs(other)[path], downs[path])


def test_same_shape_layers_get_different_inits():
    class Twins(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="b")(nn.Conv(4, (3, 3), name="a")(x))

    x = _x((1, 6, 6, 4))
    factors = lora.init_lora(Twins(), LoraConfig(((".*", 2),)), jax.random.key(0), x)
    assert factors["a"]["lora_a"].shape == factors["b"]["lora_a"].shape
    assert not np.allclose(factors["a"]["lora_a"], factors["b"]["lora_a"])


def _downs(factors):
    flat = traverse_util.flatten_dict(factors)
    return {"/".join(n[:-1]): v for n, v in flat.items() if n[-1] == lora.DOWN}


@pytest.mark.parametrize("path", list(KINDS))
def test_unmerged_equals_merged_per_layer_kind(net_setup, path):
    model, x, params, _, factors = net_setup
    config = LoraConfig(targets=((re.escape(path), 3),), alpha=6.0)
    factors = _randomise_up(lora.init_lora(model, config, jax.random.key(5), x))
    base = model.apply({"params": params}, x)
    adapted = lora.apply(model, params, factors, config, x)
    merged = lora.merge(params, factors, config)
    from_merged = model.apply({"params": merged}, x)
    assert np.abs(adapted - base).max() > 1e-3, "the adapter must change the output"
    np.testing.assert_allclose(adapted, from_merged, atol=1e-5, rtol=1e-5)
    restored = lora.unmerge(merged, factors, config)
    for (n, a), b in zip(
        traverse_util.flatten_dict(restored).items(), traverse_util.flatten_dict(params).values()
    ):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=str(n))


@pytest.mark.parametrize("backward", ["merged", "low_rank"])
def test_gradients_equal_the_explicit_branch_reference(net_setup, backward, monkeypatch):
    """Both fast paths differentiate like `W0 x + scale * dW x`: factors, input and kernels.

    "merged": autodiff through the merged kernel; "low_rank": the custom VJP that skips the dense
    kernel gradient, forced on every 1x1 and Dense layer (normally only wide ones take it).
    """
    ratio = 0 if backward == "low_rank" else float("inf")
    monkeypatch.setattr(lora, "LOW_RANK_BACKWARD_RATIO", ratio)
    model, x, params, config, factors = net_setup
    factors = _randomise_up(factors)
    flat_params = traverse_util.flatten_dict(params)

    def reference(factors, x):
        # Plain reference: each adapted kernel replaced by `W0 + scale * A @ B`, built here with
        # jnp (not lora.merge), then the unmodified flax model.
        out = dict(flat_params)
        for names, leaf in traverse_util.flatten_dict(factors).items():
            if names[-1] != lora.DOWN:
                continue
            layer = names[:-1]
            up = traverse_util.flatten_dict(factors)[(*layer, lora.UP)]
            kernel = flat_params[(*layer, "kernel")]
            out[(*layer, "kernel")] = kernel + (leaf @ up).reshape(kernel.shape) * config.scale(
                leaf.shape[-1]
            )
        return jnp.sum(jnp.tanh(model.apply({"params": traverse_util.unflatten_dict(out)}, x)))

    def fast(factors, x):
        return jnp.sum(jnp.tanh(lora.apply(model, params, factors, config, x)))

    want = jax.grad(reference, argnums=(0, 1))(factors, x)
    got = jax.grad(fast, argnums=(0, 1))(factors, x)
    for (n, a), b in zip(
        traverse_util.flatten_dict(got[0]).items(), traverse_util.flatten_dict(want[0]).values()
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(n))
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=1e-5)

    # Full fine-tuning with LoRA: the frozen kernels' (and biases') gradients too.
    def reference_params(params):
        nonlocal flat_params
        flat_params = traverse_util.flatten_dict(params)
        return reference(factors, x)

    want = jax.grad(reference_params)(params)
    got = jax.grad(lambda p: jnp.sum(jnp.tanh(lora.apply(model, p, factors, config, x))))(params)
    for (n, a), b in zip(
        traverse_util.flatten_dict(got).items(), traverse_util.flatten_dict(want).values()
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(n))


def test_low_rank_backward_is_taken_by_wide_ungrouped_layers_only():
    conv = layers.Conv(256, (1, 1))
    assert lora.uses_low_rank_backward(conv, (1, 1, 128, 256), rank=4)  # a deep NAFNet 1x1
    assert not lora.uses_low_rank_backward(conv, (1, 1, 32, 64), rank=4)  # a first-stage 1x1
    assert not lora.uses_low_rank_backward(conv, (1, 1, 128, 256), rank=32)  # rank too high
    assert not lora.uses_low_rank_backward(layers.Conv(256, (3, 3)), (3, 3, 128, 256), rank=4)
    depthwise = layers.Conv(256, (3, 3), feature_group_count=256)
    assert not lora.uses_low_rank_backward(depthwise, (3, 3, 1, 256), rank=1)
    assert lora.uses_low_rank_backward(nn.Dense(512), (512, 512), rank=8)
    # Not a matmul per pixel: strided, padded or dilated 1x1 convs keep the merged backward.
    assert not lora.uses_low_rank_backward(layers.Conv(256, (1, 1), strides=2), (1, 1, 128, 256), 4)
    assert not lora.uses_low_rank_backward(layers.Conv(256, (1, 1), padding=1), (1, 1, 128, 256), 4)
    assert not lora.uses_low_rank_backward(
        layers.Conv(256, (1, 1), input_dilation=2), (1, 1, 128, 256), 4
    )


def test_all_layers_at_once_merge_and_jit(net_setup):
    model, x, params, config, factors = net_setup
    factors = _randomise_up(factors)
    adapted = jax.jit(lambda p, f, x: lora.apply(model, p, f, config, x))(params, factors, x)
    eager = lora.apply(model, params, factors, config, x)
    from_merged = model.apply({"params": lora.merge(params, factors, config)}, x)
    np.testing.assert_allclose(adapted, eager, atol=1e-5)
    np.testing.assert_allclose(adapted, from_merged, atol=1e-5, rtol=1e-5)


def _conv_reference(x, kernel, *, strides=1, padding="SAME", dilation=1, groups=1):
    return lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize(
    "spec",
    [
        dict(kernel=(3, 3), cin=4, cout=6),
        dict(kernel=(1, 1), cin=4, cout=6),
        dict(kernel=(2, 2), cin=4, cout=6, strides=2, padding="VALID"),
        dict(kernel=(3, 3), cin=4, cout=6, dilation=2),
        dict(kernel=(3, 3), cin=4, cout=6, groups=2),
        dict(kernel=(3, 3), cin=6, cout=6, groups=6),
    ],
    ids=["3x3", "1x1", "strided", "dilated", "grouped", "depthwise"],
)
def test_delta_matches_explicit_numpy_kernel(spec):
    kh, kw = spec["kernel"]
    cin, cout, groups = spec["cin"], spec["cout"], spec.get("groups", 1)
    strides, padding, dilation = (
        spec.get("strides", 1),
        spec.get("padding", "SAME"),
        spec.get("dilation", 1),
    )

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(
                cout,
                (kh, kw),
                strides=strides,
                padding=padding,
                kernel_dilation=dilation,
                feature_group_count=groups,
                name="conv",
            )(x)

    model, x = One(), _x((2, 8, 8, cin), seed=2)
    params = _params(model, x)
    config = LoraConfig(targets=(("conv", 2),), alpha=4.0)
    factors = _randomise_up(lora.init_lora(model, config, jax.random.key(1), x))
    a = np.asarray(factors["conv"]["lora_a"], np.float64)
    b = np.asarray(factors["conv"]["lora_b"], np.float64)
    # Independent reference: the delta kernel built in numpy, rows ordered (kh, kw, cin/g).
    delta = (a @ b).reshape(kh, kw, cin // groups, cout) * (4.0 / 2)
    want = _conv_reference(
        x,
        jnp.asarray(delta, jnp.float32),
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    got = lora.apply(model, params, factors, config, x) - model.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_dense_delta_matches_numpy():
    x = _x((3, 7))

    class Wrap(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="fc")(x)

    params = _params(Wrap(), x)
    config = LoraConfig(targets=(("fc", 3),))
    factors = _randomise_up(lora.init_lora(Wrap(), config, jax.random.key(1), x))
    a, b = (np.asarray(factors["fc"][k], np.float64) for k in ("lora_a", "lora_b"))
    want = np.asarray(x, np.float64) @ a @ b
    got = lora.apply(Wrap(), params, factors, config, x) - Wrap().apply({"params": params}, x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fast_project_conv_is_adapted_like_nn_conv():
    model, x = FastNet(), _x((2, 8, 8, 3))
    params = _params(model, x)
    config = LoraConfig(targets=((".*", 2),))
    factors = lora.init_lora(model, config, jax.random.key(1), x)
    assert set(lora.ranks(factors)) == {"point", "depthwise", "plain"}
    np.testing.assert_array_equal(
        lora.apply(model, params, factors, config, x), model.apply({"params": params}, x)
    )
    factors = _randomise_up(factors)
    adapted = lora.apply(model, params, factors, config, x)
    from_merged = model.apply({"params": lora.merge(params, factors, config)}, x)
    np.testing.assert_allclose(adapted, from_merged, atol=1e-5, rtol=1e-5)


def test_per_layer_ranks_first_match_wins(net_setup):
    model, x, *_ = net_setup
    config = LoraConfig(
        targets=(("body/depthwise|body/norm", 0), ("body/.*", 4), ("stem", 1), (".*", 0)), alpha=2.0
    )
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    assert lora.ranks(factors) == {
        "body/point": 4,
        "body/down": 4,
        "body/dilated": 4,
        "body/grouped": 4,
        "stem": 1,
    }
    # Exact per-layer ranks (as CoLoRA allocates them) round-trip through targets_from_ranks.
    exact = LoraConfig(targets=dict(lora.targets_from_ranks(lora.ranks(factors))), alpha=2.0)
    assert lora.ranks(lora.init_lora(model, exact, jax.random.key(0), x)) == lora.ranks(factors)


def test_non_array_sample_kwargs_and_shape_structs(net_setup):
    model, x, _, config, factors = net_setup
    abstract = jax.ShapeDtypeStruct(x.shape, x.dtype)
    again = lora.init_lora(model, config, jax.random.key(3), abstract, train=True)
    jax.tree.map(np.testing.assert_array_equal, again, factors)


def test_unused_rule_is_named(net_setup):
    model, x, *_ = net_setup
    config = LoraConfig(targets=(("stem", 2), ("body/conv_typo", 2)))
    with pytest.raises(ValueError, match="body/conv_typo"):
        lora.init_lora(model, config, jax.random.key(0), x)


def test_shadowed_rule_is_named(net_setup):
    model, x, *_ = net_setup
    config = LoraConfig(targets=((".*norm", 0), ("body/.*", 2), ("body/point", 4)))
    with pytest.raises(ValueError, match="body/point"):
        lora.init_lora(model, config, jax.random.key(0), x)


def test_duplicate_target_is_named():
    with pytest.raises(ValueError, match="stem"):
        LoraConfig(targets=(("stem", 2), ("stem", 4)))


def test_unsupported_module_type_is_named(net_setup):
    model, x, *_ = net_setup
    config = LoraConfig(targets=(("body/.*", 2),))  # also selects the LayerNorm body/norm
    with pytest.raises(TypeError, match=r"body/norm.*LayerNorm"):
        lora.init_lora(model, config, jax.random.key(0), x)


def test_containers_matched_by_a_rule_are_skipped(net_setup):
    model, x, *_ = net_setup
    # "body" itself is a container (with a parameter of its own): skipped, not an error.
    config = LoraConfig(targets=((".*norm", 0), ("body.*", 2)))
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    assert "body" not in lora.ranks(factors)
    assert len(lora.ranks(factors)) == 5


def test_apply_with_factors_of_another_config_is_an_error(net_setup):
    model, x, params, _, factors = net_setup
    with pytest.raises(ValueError, match="'stem'.*rank 5"):
        lora.apply(model, params, factors, LoraConfig(((".*norm", 0), (".*", 5))), x)
    only_stem = lora.init_lora(model, LoraConfig((("stem", 2),)), jax.random.key(0), x)
    with pytest.raises(ValueError, match="No LoRA factors for layer 'head'"):
        lora.apply(model, params, only_stem, LoraConfig((("stem|head", 2),)), x)


def test_module_paths_lists_the_layers(net_setup):
    model, x, *_ = net_setup
    paths = intercept.module_paths(model, x)
    assert paths["body/grouped"] == "Conv" and paths["head"] == "Dense"
    assert paths["body"] == "Body"
