"""Adapters under the backbones' `remat` and `dtype` fields (issue 11, item 1).

Each method is built as `train.py` builds it (`methods.build` on the config's defaults) on a
nafnet-tiny with `remat="blocks"` or `dtype=bfloat16`, and compared with the same method on the
plain float32 model: rematerialisation changes nothing (outputs and trainable gradients to
1e-5), bf16 computation stays close and keeps float32 parameters and gradients. CoLoRA is
LoRA with per-layer ranks (the same interceptor), so the LoRA case covers its layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ir_lora import methods, models
from ir_lora.methods.lora_ir import routing
from ir_lora.peft import intercept, lora

SHAPE = (2, 16, 16, 3)
pytestmark = pytest.mark.usefixtures("fast_compilation")


def _random(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), tree)


def _setup(method: str):
    """`(config, x, trainable, frozen)` of `method` on the plain nafnet-tiny."""
    config = common.training_config("finetune", method, "nafnet-tiny")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=SHAPE), jnp.float32)
    backbone = _random(intercept.eval_shape_init(models.build("nafnet-tiny"), x)["params"], 1)
    if method == "lora_ir":
        router = routing.build_router(config.router)
        backbone = {
            "params": backbone,
            "modulation": None,
            "router": router.init(jax.random.key(2), x)["params"],
        }
    adaptation = methods.build(config, models.build("nafnet-tiny"), image_shape=SHAPE)
    trainable, frozen = jax.jit(adaptation.method.init_fn)(jax.random.key(0), backbone)
    # Non-zero adapters (LoRA's up factors start at zero), so every factor gets a gradient.
    trainable = jax.tree.map(lambda a, r: a + r, trainable, _random(trainable, 3, 0.05))
    return config, x, backbone, trainable, frozen


def _loss_and_grads(setup, **overrides):
    config, x, backbone, trainable, frozen = setup
    adaptation = methods.build(config, models.build("nafnet-tiny", **overrides), image_shape=SHAPE)
    # The fields change no parameter: the method's trees are those of the plain model.
    shapes = jax.eval_shape(adaptation.method.init_fn, jax.random.key(0), backbone)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
        lambda a: (a.shape, a.dtype), (trainable, frozen)
    )

    def loss(trainable):
        out = adaptation.method.apply_fn(trainable, frozen, x)
        return jnp.mean((out - 0.5) ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return value, out, grads


@pytest.mark.parametrize("method", ["lora", "adaptir", "lora_ir"])
def test_adapters_under_remat_and_bfloat16(method, monkeypatch):
    # LoRA: every 1x1 conv takes the low-rank custom VJP (at full size only the wide ones do),
    # the other convs the merged kernel, so both backward paths run.
    monkeypatch.setattr(lora, "LOW_RANK_BACKWARD_RATIO", 0)
    setup = _setup(method)
    want, want_out, want_grads = _loss_and_grads(setup)
    want_flat = _flat(want_grads)

    # remat="blocks": the same numbers.
    got, got_out, got_grads = _loss_and_grads(setup, remat="blocks")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
    # AdaptIR's phase gradients (angles of near-zero FFT bins) are ill-conditioned: two
    # compilations of the plain model itself (XLA optimisations on and off) differ by 1.5e-3.
    tolerance = 5e-3 if method == "adaptir" else 1e-5
    assert _relative(_flat(got_grads), want_flat) < tolerance

    # dtype=bfloat16: close, with float32 outputs, parameters and gradients.
    _, got_out, got_grads = _loss_and_grads(setup, dtype="bfloat16")
    assert got_out.dtype == jnp.float32
    assert 0 < _relative(got_out, want_out) < 2e-2
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got_grads))
    assert _relative(_flat(got_grads), want_flat) < 5e-2


def _flat(tree):
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def _relative(got, want) -> float:
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
