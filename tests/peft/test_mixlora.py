"""Mixture of low-rank experts: the two execution paths agree with `lax` and numpy references,
batch 1 included, and the routing weights have the documented form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ir_lora.peft import mixlora

DN = ("NHWC", "HWIO", "NHWC")

# (kernel_hw, cin, cout, groups, config)
CONVS = {
    "3x3": ((3, 3), 4, 6, 1, dict(padding="SAME")),
    "1x1": ((1, 1), 4, 6, 1, dict(padding="VALID")),
    "strided2x2": ((2, 2), 4, 8, 1, dict(strides=2, padding="VALID")),
    "depthwise3x3": ((3, 3), 6, 6, 6, dict(padding=1, feature_group_count=6)),
    "grouped_dilated": ((3, 3), 4, 6, 2, dict(padding=2, kernel_dilation=2, feature_group_count=2)),
}


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _setup(kernel_hw, cin, cout, groups, batch, num_experts=3, rank=2, seed=0):
    rng = np.random.default_rng(seed)
    kernel_shape = (*kernel_hw, cin // groups, cout)
    down_shape, up_shape = mixlora.factor_shapes(kernel_shape, rank=rank, num_experts=num_experts)
    weights = rng.dirichlet(np.ones(num_experts), size=batch)
    return (
        _normal(rng, batch, 7, 6, cin),
        _normal(rng, *kernel_shape),
        _normal(rng, cout),
        _normal(rng, *down_shape),
        _normal(rng, *up_shape),  # non-zero experts
        jnp.asarray(weights, jnp.float32),
    )


def _lax_conv(x, kernel, config):
    pad = config.get("padding", "SAME")
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    stride = config.get("strides", 1)
    dil = config.get("kernel_dilation", 1)
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        pad,
        rhs_dilation=(dil, dil),
        dimension_numbers=DN,
        feature_group_count=config.get("feature_group_count", 1),
        precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_paths_agree_with_lax_sum_of_branches(name, batch):
    kernel_hw, cin, cout, groups, config = CONVS[name]
    x, kernel, bias, down, up, weights = _setup(kernel_hw, cin, cout, groups, batch)
    scale = 2.0
    deltas = [(down[e] @ up[e]).reshape(kernel.shape) for e in range(down.shape[0])]
    want = _lax_conv(x, kernel, config) + bias
    for e, delta in enumerate(deltas):
        want = want + scale * weights[:, e, None, None, None] * _lax_conv(x, delta, config)
    for path in mixlora.PATHS:
        fn = jax.jit(
            lambda *a, path=path: mixlora.mix_conv(*a, bias=bias, scale=scale, path=path, **config)
        )
        got = fn(x, kernel, down, up, weights)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=path)


def _numpy_conv_one(x, kernel, stride, pad, dilation, groups):
    """Direct (H, W, Cin) x HWIO convolution with explicit loops over taps and groups."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin_g, cout = kernel.shape
    out_h = (x.shape[0] - dilation * (kh - 1) - 1) // stride + 1
    out_w = (x.shape[1] - dilation * (kw - 1) - 1) // stride + 1
    cout_g = cout // groups
    y = np.zeros((out_h, out_w, cout))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilation, i * dilation + stride * (out_h - 1) + 1, stride)
            cols = slice(j * dilation, j * dilation + stride * (out_w - 1) + 1, stride)
            patch = x[rows, cols]
            for g in range(groups):
                xin = patch[..., g * cin_g : (g + 1) * cin_g]
                y[..., g * cout_g : (g + 1) * cout_g] += (
                    xin @ kernel[i, j][:, g * cout_g : (g + 1) * cout_g]
                )
    return y


def test_merged_path_equals_numpy_reference_for_one_sample():
    kernel_hw, cin, cout, groups = (3, 3), 4, 6, 2
    x, kernel, bias, down, up, weights = _setup(kernel_hw, cin, cout, groups, batch=2, seed=3)
    config = dict(strides=2, padding=1, feature_group_count=groups)
    got = mixlora.mix_conv(
        x, kernel, down, up, weights, bias=bias, scale=0.5, path="merged", **config
    )
    a, b, w = (np.asarray(t, np.float64) for t in (down, up, weights))
    n = 1
    merged = np.asarray(kernel, np.float64) + 0.5 * sum(
        w[n, e] * (a[e] @ b[e]).reshape(kernel.shape) for e in range(a.shape[0])
    )
    want = _numpy_conv_one(np.asarray(x[n], np.float64), merged, 2, 1, 1, groups) + np.asarray(bias)
    np.testing.assert_allclose(got[n], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5), (3, 5), (2, 4, 3, 5)])
def test_dense_paths_agree_with_reference(shape):
    rng = np.random.default_rng(1)
    x, kernel = _normal(rng, *shape), _normal(rng, 5, 7)
    down, up = _normal(rng, 4, 5, 3), _normal(rng, 4, 3, 7)
    weights = mixlora.route(_normal(rng, shape[0], 4), mode="topk", k=2)
    xs, a, b, w = (np.asarray(t, np.float64) for t in (x, down, up, weights))
    want = np.stack(
        [
            xs[n] @ (np.asarray(kernel) + 2.0 * np.einsum("e,eio->io", w[n], a @ b))
            for n in range(shape[0])
        ]
    )
    for path in mixlora.PATHS:
        fn = jax.jit(lambda *a, path=path: mixlora.mix_dense(*a, scale=2.0, path=path))
        got = fn(x, kernel, down, up, weights)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=path)


def test_zero_up_factors_leave_the_layer_unchanged():
    kernel_hw, cin, cout, groups, config = CONVS["3x3"]
    x, kernel, bias, _, _, weights = _setup(kernel_hw, cin, cout, groups, batch=2)
    factors = mixlora.init_factors(
        jax.random.key(0, impl="rbg"), kernel.shape, rank=2, num_experts=3
    )
    assert factors["down"].shape == (3, 3 * 3 * 4, 2) and factors["up"].shape == (3, 2, 6)
    bound = 1 / np.sqrt(3 * 3 * 4)
    assert float(jnp.abs(factors["down"]).max()) <= bound and float(factors["down"].std()) > 0
    got = mixlora.mix_conv(x, kernel, factors["down"], factors["up"], weights, bias=bias, **config)
    np.testing.assert_array_equal(got, mixlora.conv(x, kernel, **config) + bias)


def test_gradients_reach_every_expert_in_both_paths():
    kernel_hw, cin, cout, groups, config = CONVS["3x3"]
    x, kernel, bias, down, up, weights = _setup(kernel_hw, cin, cout, groups, batch=2)

    def loss(factors, path):
        y = mixlora.mix_conv(x, kernel, factors[0], factors[1], weights, path=path, **config)
        return jnp.sum(y**2)

    grads = {p: jax.jit(jax.grad(loss), static_argnums=1)((down, up), p) for p in mixlora.PATHS}
    for g_branch, g_merged in zip(grads["branches"], grads["merged"], strict=True):
        np.testing.assert_allclose(g_branch, g_merged, rtol=1e-4, atol=1e-3)
        assert np.all(np.abs(np.asarray(g_branch)).sum(axis=(1, 2)) > 0)


def test_route_modes():
    logits = jnp.array([[0.1, 2.0, -1.0, 0.5], [3.0, 3.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    soft = mixlora.route(logits)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(soft, jax.nn.softmax(logits), rtol=1e-6)

    top2 = np.asarray(mixlora.route(logits, mode="topk", k=2))
    np.testing.assert_allclose(top2.sum(-1), 1.0, rtol=1e-6)
    assert np.all((top2 > 0).sum(-1) == 2)  # exactly k kept, ties included
    e = np.exp([2.0, 0.5])
    np.testing.assert_allclose(top2[0], [0, e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-6)
    np.testing.assert_allclose(top2[1], [0.5, 0.5, 0, 0], rtol=1e-6)

    top1 = np.asarray(mixlora.route(logits, mode="top1"))
    np.testing.assert_array_equal(top1[:2], [[0, 1, 0, 0], [1, 0, 0, 0]])
    assert np.all(top1.sum(-1) == 1) and set(np.unique(top1)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mixlora.route(logits, mode="topk", k=1)[:2], top1[:2])

    g = jax.grad(lambda z: jnp.sum(mixlora.route(z, mode="topk", k=2) * jnp.arange(4.0)))(logits)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        mixlora.route(logits, mode="topk", k=5)
    with pytest.raises(ValueError, match="mode must be one of"):
        mixlora.route(logits, mode="hard")


@pytest.mark.parametrize("normalize", ["softmax", "sum"])
def test_similarity_route_picks_matching_prototype(normalize):
    prototypes = jax.random.normal(jax.random.key(2, impl="rbg"), (5, 16))
    for j in range(5):
        embedding = 3.0 * prototypes[j][None] + 0.0
        w1 = np.asarray(mixlora.similarity_route(embedding, prototypes, k=1, normalize=normalize))
        np.testing.assert_array_equal(w1[0], np.eye(5)[j])
        w3 = np.asarray(mixlora.similarity_route(embedding, prototypes, k=3, normalize=normalize))
        assert np.argmax(w3[0]) == j and (w3[0] > 0).sum() <= 3
        np.testing.assert_allclose(w3.sum(-1), 1.0, rtol=1e-6)


def test_similarity_route_sum_normalisation_values():
    prototypes = jnp.eye(3)
    embedding = jnp.array([[0.6, 0.8, 0.0], [-1.0, 0.0, 0.0]])
    w = np.asarray(mixlora.similarity_route(embedding, prototypes, k=2, normalize="sum"))
    np.testing.assert_allclose(w[0], [0.6 / 1.4, 0.8 / 1.4, 0.0], rtol=1e-6)
    # All kept similarities <= 0: equal weights over the k kept prototypes.
    np.testing.assert_allclose(w[1].sum(), 1.0) and np.testing.assert_allclose(w[1][w[1] > 0], 0.5)


def test_bad_shapes_raise():
    kernel_hw, cin, cout, groups, config = CONVS["3x3"]
    x, kernel, bias, down, up, weights = _setup(kernel_hw, cin, cout, groups, batch=2)
    with pytest.raises(ValueError, match=r"routing weights must be .*\(2, 3\)"):
        mixlora.mix_conv(x, kernel, down, up, weights[:1], **config)
    with pytest.raises(ValueError, match="do not fit kernel"):
        mixlora.mix_conv(x, kernel, down[:, :5], up, weights, **config)


@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 1), (6, 6, 6)])
def test_loralib_experts_match_torch_conv(cin, cout, groups):
    """LoRA-IR's ConvMixLoRA layout, computed in PyTorch the way the official layer does."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    experts, rank, k, batch = 3, 2, 3, 2
    lora_a = rng.normal(size=(experts, rank * k, cin * k))
    lora_b = rng.normal(size=(experts, cout // groups * k, rank * k))
    w0 = rng.normal(size=(cout, cin // groups, k, k))
    x = rng.normal(size=(batch, cin, 7, 5))
    weights = rng.dirichlet(np.ones(experts), size=batch)
    t = torch.from_numpy
    want = []
    for n in range(batch):
        delta = sum(
            weights[n, e] * (t(lora_b[e]) @ t(lora_a[e])).view(cout, cin // groups, k, k)
            for e in range(experts)
        )
        y = torch.nn.functional.conv2d(
            t(x[n : n + 1]), t(w0) + 2.0 * delta, padding=1, groups=groups
        )
        want.append(y.permute(0, 2, 3, 1).numpy()[0])
    kernel_shape = (k, k, cin // groups, cout)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    deltas = mixlora.from_loralib(f32(lora_a), f32(lora_b), kernel_shape)
    kernel = f32(w0.transpose(2, 3, 1, 0))
    xs = f32(x.transpose(0, 2, 3, 1))
    for path in mixlora.PATHS:
        got = mixlora.mix_conv_deltas(
            xs, kernel, deltas, f32(weights), scale=2.0, path=path, padding=1,
            feature_group_count=groups,
        )  # fmt: skip
        np.testing.assert_allclose(got, np.stack(want), atol=2e-4, rtol=1e-5, err_msg=path)
