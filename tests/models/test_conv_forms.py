"""The per-backend convolution switch of `ir_lora.models.layers`: which form it selects, how it is
overridden, and that both forms compute the same values and gradients (1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora.models import layers

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_default_form_follows_the_backend():
    assert layers.default_conv_form("cpu") == "cpu"
    assert layers.default_conv_form("gpu") == "lax"
    assert layers.default_conv_form("tpu") == "lax"
    assert layers.default_conv_form() == layers.default_conv_form(jax.default_backend())


def test_overrides_in_order_scope_setting_environment(monkeypatch):
    monkeypatch.delenv(layers.CONV_FORM_ENV, raising=False)
    monkeypatch.setattr(layers, "CONV_FORM", None)
    assert layers.conv_form() == layers.default_conv_form()
    monkeypatch.setenv(layers.CONV_FORM_ENV, "lax")
    assert layers.conv_form() == "lax"
    monkeypatch.setenv(layers.CONV_FORM_ENV, "auto")
    assert layers.conv_form() == layers.default_conv_form()
    monkeypatch.setenv(layers.CONV_FORM_ENV, "lax")
    monkeypatch.setattr(layers, "CONV_FORM", "cpu")
    assert layers.conv_form() == "cpu"
    with layers.conv_form_scope("lax"):
        assert layers.conv_form() == "lax"
        with layers.conv_form_scope("cpu"):
            assert layers.conv_form() == "cpu"
        assert layers.conv_form() == "lax"
    assert layers.conv_form() == "cpu"


def test_unknown_forms_name_their_source(monkeypatch):
    monkeypatch.setattr(layers, "CONV_FORM", None)
    monkeypatch.setenv(layers.CONV_FORM_ENV, "cudnn")
    with pytest.raises(ValueError, match="IR_LORA_CONV_FORM='cudnn'"):
        layers.conv_form()
    with (
        pytest.raises(ValueError, match="conv_form_scope='shifted'"),
        layers.conv_form_scope("shifted"),
    ):
        pass


def _primitives(fn, *args):
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


def _conv_apply(conv, params):
    return lambda x: conv.apply(params, x)


@pytest.mark.parametrize(
    "kwargs,cpu_has_conv",
    [
        (dict(features=6, kernel_size=(1, 1)), False),  # 2-D matmul on "cpu"
        (dict(features=6, kernel_size=(3, 3), padding=1, feature_group_count=6), False),
        (dict(features=5, kernel_size=(3, 3), padding=1), True),
        (dict(features=4, kernel_size=(2, 2), strides=2, padding="VALID"), True),
    ],
)
def test_each_form_is_selected_and_both_agree(kwargs, cpu_has_conv):
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 6))
    conv = layers.Conv(**kwargs)
    params = conv.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.3, params)
    weights = jax.random.normal(jax.random.key(2), conv.apply(params, x).shape)

    def loss(params, x):
        return jnp.sum(jnp.sin(conv.apply(params, x)) * weights)

    results = {}
    for form in ("cpu", "lax"):
        with layers.conv_form_scope(form):
            primitives = _primitives(_conv_apply(conv, params), x)
            results[form] = (conv.apply(params, x), jax.grad(loss, (0, 1))(params, x))
        has_conv = "conv_general_dilated" in primitives
        assert has_conv == (form == "lax" or cpu_has_conv), (form, primitives)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        results["cpu"],
        results["lax"],
    )


def test_lax_form_keeps_feature_group_count():
    x = jnp.ones((1, 4, 4, 3))
    conv = layers.Conv(3, (3, 3), padding=1, feature_group_count=3)
    params = conv.init(jax.random.key(0), x)
    with layers.conv_form_scope("lax"):
        jaxpr = jax.make_jaxpr(_conv_apply(conv, params))(x)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert eqn.params["feature_group_count"] == 3
