"""Restormer's channel attention (grams scaled by the norms afterwards, no head-major transposes)
equals the official order of operations (normalise, transpose per head, q k^T), values and
gradients to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora.models import restormer

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _official_order(qkv, temperature):
    # restormer_arch.py: rearrange 'b (head c) h w -> b head c (h w)', F.normalize over the
    # pixels, softmax(q k^T * temperature), attn @ v, rearrange back.
    n, h, w, c3 = qkv.shape
    heads = temperature.shape[0]
    c = c3 // 3
    d = c // heads

    def split(t):
        return t.reshape(n, h * w, heads, d).transpose(0, 2, 3, 1)

    def normalize(t):
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
    attn = jax.nn.softmax(
        normalize(q) @ jnp.swapaxes(normalize(k), -1, -2) * temperature[:, None, None], -1
    )
    return (attn @ v).transpose(0, 3, 1, 2).reshape(n, h, w, c)


@pytest.mark.parametrize("heads,d", [(1, 5), (3, 4)])
def test_channel_attention_matches_the_official_order(heads, d):
    kq, kt, kw = jax.random.split(jax.random.key(0), 3)
    qkv = jax.random.normal(kq, (2, 6, 5, 3 * heads * d))
    temperature = 0.5 + jax.random.uniform(kt, (heads,))
    weights = jax.random.normal(kw, (2, 6, 5, heads * d))
    np.testing.assert_allclose(
        restormer.channel_attention(qkv, temperature),
        _official_order(qkv, temperature),
        atol=1e-5,
        rtol=1e-5,
    )

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)) * weights)

    got = jax.grad(loss(restormer.channel_attention), (0, 1))(qkv, temperature)
    want = jax.grad(loss(_official_order), (0, 1))(qkv, temperature)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_zero_query_channel_is_floored_like_f_normalize():
    qkv = jax.random.normal(jax.random.key(1), (1, 4, 4, 6))
    qkv = qkv.at[..., 0].set(0.0)  # q channel 0 all zero: norm floored at 1e-12, logits 0
    temperature = jnp.ones((1,))
    got = restormer.channel_attention(qkv, temperature)
    np.testing.assert_allclose(got, _official_order(qkv, temperature), atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(got))
