"""The fast convolution forms equal `lax.conv_general_dilated`, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from ir_lora.models import layers

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, k, padding, groups):
    return lax.conv_general_dilated(
        x, k, (1, 1), padding, dimension_numbers=DN, feature_group_count=groups
    )


@pytest.mark.parametrize(
    "kernel_hw,padding", [((3, 3), "SAME"), ((3, 3), ((1, 1), (1, 1))), ((5, 5), "VALID")]
)
def test_depthwise_matches_grouped_conv(kernel_hw, padding):
    c = 6
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 9, 7, c))
    k = jax.random.normal(kk, (*kernel_hw, 1, c))
    fast = lambda x, k: layers.fast_conv_general_dilated(
        x,
        k,
        (1, 1),
        padding,
        dimension_numbers=lax.conv_dimension_numbers(x.shape, k.shape, DN),
        feature_group_count=c,
    )
    ref = lambda x, k: _reference(x, k, padding, c)
    np.testing.assert_allclose(fast(x, k), ref(x, k), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    for got, want in zip(jax.grad(loss(fast), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kernel_hw,pads",
    [((3, 3), ((0, 2), (2, 0))), ((3, 3), ((3, 4), (1, 1))), ((1, 3), ((0, 0), (1, 1)))],
)
@pytest.mark.parametrize("wrt", [(0,), (1,), (0, 1)])
def test_depthwise_custom_vjp_matches_grouped_conv(kernel_hw, pads, wrt):
    # Asymmetric, larger-than-kernel and one-sided paddings; gradients w.r.t. the input only
    # (frozen kernel), the kernel only, and both: each takes its own branch of the custom VJP.
    c = 5
    kx, kk = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (2, 6, 7, c))
    k = jax.random.normal(kk, (*kernel_hw, 1, c))
    ref = lambda x, k: _reference(x, k, pads, c)
    np.testing.assert_allclose(layers.depthwise_conv(x, k, pads), ref(x, k), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    got = jax.grad(loss(lambda x, k: layers.depthwise_conv(x, k, pads)), wrt)(x, k)
    want = jax.grad(loss(ref), wrt)(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def _chain_temp_bytes(depthwise, frozen_kernels=False):
    """XLA's temporaries for the gradient of 4 blocks `x + (tanh(dw(x @ w)) @ w.T)`."""

    def loss(w, kernels, x):
        for kernel in kernels:
            h = depthwise(jnp.dot(x, w), kernel, ((1, 1), (1, 1)))
            x = x + jnp.dot(jnp.tanh(h), w.T)
        return jnp.mean(x**2)

    w = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    kernels = [jax.ShapeDtypeStruct((3, 3, 1, 64), jnp.float32)] * 4
    x = jax.ShapeDtypeStruct((2, 32, 32, 16), jnp.float32)
    wrt = (0,) if frozen_kernels else (0, 1)
    compiled = jax.jit(jax.grad(loss, wrt)).lower(w, kernels, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_depthwise_backward_keeps_no_shifted_copies():
    # Plain autodiff of the shifted sum kept every shifted slice of the input alive from the
    # forward to the backward (51 activation-sized buffers here against 11 for lax's grouped
    # conv); the custom VJP must stay at the grouped conv's footprint, and a frozen kernel must
    # not keep the conv input.
    grouped = lambda x, k, pads: _reference(x, k, pads, x.shape[-1])
    ours, reference = _chain_temp_bytes(layers.depthwise_conv), _chain_temp_bytes(grouped)
    assert ours <= 1.1 * reference, (ours, reference)
    assert _chain_temp_bytes(layers.depthwise_conv, frozen_kernels=True) < 0.9 * ours


def test_pointwise_matches_conv():
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 5, 4, 8))
    k = jax.random.normal(kk, (1, 1, 8, 3))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    fast = lambda x, k: layers.fast_conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)
    ref = lambda x, k: _reference(x, k, "SAME", 1)
    np.testing.assert_allclose(fast(x, k), ref(x, k), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) ** 2)
    for got, want in zip(jax.grad(loss(fast), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=4, kernel_size=(3, 3)),
        dict(features=4, kernel_size=(1, 1)),
        dict(features=4, kernel_size=(3, 3), feature_group_count=4),
        dict(features=8, kernel_size=(2, 2), strides=2),
        dict(features=8, kernel_size=(3, 3), feature_group_count=2, kernel_dilation=2),
    ],
)
def test_conv_module_is_a_drop_in_nn_conv(kwargs):
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    fast, plain = layers.Conv(**kwargs), nn.Conv(**kwargs)
    assert isinstance(fast, nn.Conv)
    params = plain.init(jax.random.key(3), x)
    chex_shapes = jax.tree.map(jnp.shape, fast.init(jax.random.key(3), x))
    assert chex_shapes == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), atol=1e-5, rtol=1e-5)


def test_pixel_shuffle_matches_torch_channel_order():
    # PyTorch PixelShuffle: out[n, c, h*r + i, w*r + j] = in[n, c*r*r + i*r + j, h, w] (NCHW).
    r, c = 2, 3
    x = np.arange(1 * 2 * 3 * c * r * r, dtype=np.float32).reshape(1, 2, 3, c * r * r)
    want = np.zeros((1, 2 * r, 3 * r, c), np.float32)
    for h in range(2):
        for w in range(3):
            for ch in range(c):
                for i in range(r):
                    for j in range(r):
                        want[0, h * r + i, w * r + j, ch] = x[0, h, w, ch * r * r + i * r + j]
    got = layers.pixel_shuffle(jnp.asarray(x), r)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(layers.pixel_unshuffle(got, r), x)


def test_depthwise_keeps_a_bfloat16_input_in_bfloat16_forward_and_backward():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, k: layers.depthwise_conv(x, k, ((1, 1), (1, 1))), x, kernel)
    dx, dkernel = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16,) * 3
    want = lax.conv_general_dilated(
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4,
    )
    np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
