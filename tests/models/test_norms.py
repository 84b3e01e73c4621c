"""The channel LayerNorms with a closed-form backward equal the plain formulas (values and
gradients, 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ir_lora.models import layers, norms

pytestmark = pytest.mark.usefixtures("fast_compilation")

# "cpu": the reductions as matrix-vector products against ones; "lax": `jnp.mean`.
REDUCTION_FORMS = pytest.mark.parametrize("form", ["cpu", "lax"])


def _plain_with_bias(x, scale, bias, eps):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _plain_bias_free(x, scale, eps):
    var = jnp.var(x, -1, keepdims=True)
    return x / jnp.sqrt(var + eps) * scale


def _inputs(c=7):
    kx, ks, kb, kw = jax.random.split(jax.random.key(0), 4)
    # A non-zero mean per pixel, so the bias-free form's kept mean matters.
    x = jax.random.normal(kx, (2, 5, 3, c)) * 2.0 + 0.7
    scale = 1.0 + 0.5 * jax.random.normal(ks, (c,))
    bias = jax.random.normal(kb, (c,))
    weights = jax.random.normal(kw, x.shape)
    return x, scale, bias, weights


@REDUCTION_FORMS
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("c", [7, 48])
def test_layer_norm_matches_the_plain_formula(eps, c, form):
    x, scale, bias, weights = _inputs(c)
    fast = lambda x, s, b: norms.layer_norm(x, s, b, eps)
    plain = lambda x, s, b: _plain_with_bias(x, s, b, eps)

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * weights)

    with layers.conv_form_scope(form):
        out = fast(x, scale, bias)
        got = jax.grad(loss(fast), (0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(out, plain(x, scale, bias), atol=1e-5, rtol=1e-5)
    want = jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@REDUCTION_FORMS
@pytest.mark.parametrize("c", [7, 48])
def test_bias_free_layer_norm_matches_the_plain_formula(c, form):
    x, scale, _, weights = _inputs(c)
    fast = lambda x, s: norms.bias_free_layer_norm(x, s, 1e-5)
    plain = lambda x, s: _plain_bias_free(x, s, 1e-5)

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * weights)

    with layers.conv_form_scope(form):
        out = fast(x, scale)
        got = jax.grad(loss(fast), (0, 1))(x, scale)
    np.testing.assert_allclose(out, plain(x, scale), atol=1e-5, rtol=1e-5)
    want = jax.grad(loss(plain), (0, 1))(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_module_has_the_parameters_of_nn_layer_norm():
    x = jnp.ones((1, 2, 2, 5))
    ours = norms.LayerNorm().init(jax.random.key(0), x)
    flax_ln = nn.LayerNorm().init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_ln)
    bias_free = norms.LayerNorm(bias_free=True).init(jax.random.key(0), x)
    assert set(bias_free["params"]) == {"scale"}


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    x, scale, bias, _ = _inputs()
    out = norms.layer_norm(x.astype(jnp.bfloat16), scale, bias, 1e-6)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32), _plain_with_bias(x, scale, bias, 1e-6), atol=5e-2, rtol=2e-2
    )
    dx = jax.grad(lambda x: jnp.sum(norms.layer_norm(x, scale, bias, 1e-6)))(x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16
