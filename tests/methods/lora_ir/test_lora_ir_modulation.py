"""LoRA-IR's degradation-aware modulation: the identity at init, channel gates after."""

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora.methods.lora_ir.modulation import DegradationModulation, DegradationPrior


def test_dam_is_identity_at_init_and_gates_after():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 32)), jnp.float32)
    prior = DegradationPrior(features=24)
    dam = DegradationModulation(features=32, hidden=16, reduction=16)

    @jax.jit
    def init(key, x, embedding):
        k_prior, k_dam = jax.random.split(key)
        e, _ = prior.init_with_output(k_prior, embedding)
        return e, dam.init(k_dam, x, e)

    e, variables = init(jax.random.key(7, impl="rbg"), x, jnp.ones((2, 24)))
    apply = jax.jit(dam.apply)
    np.testing.assert_array_equal(apply(variables, x, e), x)
    gates = dam.apply(variables, e, method="gate")
    assert gates.shape == (2, 32) and np.all((gates > 0) & (gates < 1))
    assert variables["params"]["gate_in"]["kernel"].shape == (32, 2)  # C -> C // 16
    variables["params"]["beta"] = jnp.full((32,), 0.5)
    xs = np.asarray(x, np.float64)
    normed = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-6)
    want = xs + 0.5 * normed * np.asarray(gates)[:, None, None, :]
    np.testing.assert_allclose(apply(variables, x, e), want, atol=1e-5)
