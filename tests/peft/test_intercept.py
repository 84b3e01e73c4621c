"""The generic interception mechanism: wrappers beside any method, closures, rule order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ir_lora.peft import intercept, lora
from ir_lora.peft.lora import LoraConfig

pytestmark = pytest.mark.usefixtures("fast_compilation")


class Block(nn.Module):
    """A transformer-ish block with a named sub-method, built in `setup` (not compact)."""

    width: int

    def setup(self):
        self.fc1 = nn.Dense(2 * self.width)
        self.fc2 = nn.Dense(self.width)

    def feed_forward(self, x):
        return self.fc2(nn.gelu(self.fc1(x)))

    def __call__(self, x):
        return x + self.feed_forward(x)


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = Block(4, name="shared")
        return Block(4, name="last")(shared(shared(x)))  # one block applied twice


def _x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)


def _params(model, x):
    shapes = intercept.eval_shape_init(model, x)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)


def test_parallel_adapter_beside_a_method_with_per_sample_weights_by_closure():
    """AdaptIR-style: a wrapper beside `feed_forward`, scaled per sample by a closure value."""
    model, x = Model(), _x()
    params = _params(model, x)
    per_sample = jnp.array([0.0, 1.0, 2.0])

    def adapter(next_fun, args, kwargs, module):
        y = next_fun(*args, **kwargs)
        w = intercept.variable(module, "adapter", "w", jnp.ones, (module.width, module.width))
        return y + per_sample[:, None] * (args[0] @ w)

    rules = [intercept.Rule("last", adapter, method="feed_forward", module_types=(Block,))]
    with intercept.attach(rules) as trace:
        variables = model.init(jax.random.key(0), x)
    trace.check_all_rules_used(rules)
    assert trace.wrapped == {"last": (0, "Block")}
    assert jax.tree.map(jnp.shape, variables["adapter"]) == {"last": {"w": (4, 4)}}

    w = jnp.full((4, 4), 0.1)
    with intercept.attach(rules):
        out = model.apply({"params": params, "adapter": {"last": {"w": w}}}, x)
    base = model.apply({"params": params}, x)
    h = Block(4).apply(
        {"params": params["shared"]}, Block(4).apply({"params": params["shared"]}, x)
    )
    # Sample 0 has weight 0: unchanged; the others move by weight * (h @ w).
    np.testing.assert_allclose(out, base + per_sample[:, None] * (h @ w), atol=1e-5)
    np.testing.assert_array_equal(out[0], base[0])


def test_first_match_wins_and_none_wrapper_leaves_modules_alone():
    model, x = Model(), _x()
    calls = []

    def record(next_fun, args, kwargs, module):
        calls.append(intercept.path_of(module))
        return next_fun(*args, **kwargs)

    rules = [intercept.Rule("last/fc1", None), intercept.Rule(".*/fc.", record)]
    with intercept.attach(rules) as trace:
        jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    trace.check_all_rules_used(rules)
    # The shared block's layers run twice; "last/fc1" is excepted by the first rule.
    assert sorted(calls) == ["last/fc2", "shared/fc1", "shared/fc1", "shared/fc2", "shared/fc2"]


def test_unused_rule_and_unsupported_type_are_named():
    model, x = Model(), _x()
    rules = [
        intercept.Rule("shared/fc1", lambda f, a, k, m: f(*a, **k)),
        intercept.Rule("nope", None),
    ]
    with intercept.attach(rules) as trace:
        jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    with pytest.raises(ValueError, match="'nope'"):
        trace.check_all_rules_used(rules)
    bad = [intercept.Rule(".*", lambda f, a, k, m: f(*a, **k), module_types=(nn.Conv,))]
    with pytest.raises(TypeError, match="'shared/fc1' of type Dense"), intercept.attach(bad):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def test_bypass_skips_interception():
    model, x = Model(), _x()
    calls = []

    def record(next_fun, args, kwargs, module):
        calls.append(intercept.path_of(module))
        return next_fun(*args, **kwargs)

    with intercept.attach([intercept.Rule(".*", record)]), intercept.bypass():
        jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert calls == []


def test_lora_on_setup_defined_and_shared_layers():
    model, x = Model(), _x()
    params = _params(model, x)
    config = LoraConfig(targets=((".*/fc.", 2),), alpha=4.0)
    assert hash(config) == hash(LoraConfig(targets=((".*/fc.", 2),), alpha=4.0))
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    assert set(lora.ranks(factors)) == {"shared/fc1", "shared/fc2", "last/fc1", "last/fc2"}
    factors = jax.tree.map(lambda v: v + 0.1, factors)
    adapted = jax.jit(lora.apply, static_argnums=(0, 3))(model, params, factors, config, x)
    merged = model.apply({"params": lora.merge(params, factors, config)}, x)
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=1e-5)


def test_lora_inside_nn_remat():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Conv(4, (3, 3), name="conv")(x)

    class Checkpointed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Residual(name="plain")(nn.remat(Residual)(name="remat")(x))

    model = Checkpointed()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 4)), jnp.float32)
    params = _params(model, x)
    config = LoraConfig(targets=((".*/conv", 2),))
    factors = lora.init_lora(model, config, jax.random.key(0), x)
    assert set(lora.ranks(factors)) == {"remat/conv", "plain/conv"}
    factors = jax.tree.map(lambda v: v + 0.1, factors)
    grads = jax.grad(lambda f: jnp.sum(lora.apply(model, params, f, config, x) ** 2))(factors)
    assert jax.tree.structure(grads) == jax.tree.structure(factors)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    merged = model.apply({"params": lora.merge(params, factors, config)}, x)
    np.testing.assert_allclose(lora.apply(model, params, factors, config, x), merged, atol=1e-5)


def test_mixture_of_lora_experts_from_lora_branch():
    """LoRA-IR style: E experts on one conv, mixed per sample with weights given by closure."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="conv")(x)

    rng = np.random.default_rng(2)
    model, experts, rank = Net(), 2, 2
    x = jnp.asarray(rng.normal(size=(3, 6, 6, 4)), jnp.float32)
    params = _params(model, x)
    downs = jnp.asarray(rng.normal(size=(experts, 36, rank)), jnp.float32)
    ups = jnp.asarray(rng.normal(size=(experts, rank, 4)), jnp.float32)
    weights = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])  # per-sample routing

    def mixture(next_fun, args, kwargs, module):
        y = next_fun(*args, **kwargs)
        a = intercept.variable(module, "moe", "a", lambda: downs)
        b = intercept.variable(module, "moe", "b", lambda: ups)
        for e in range(experts):
            y = y + weights[:, e, None, None, None] * lora.branch(module, args[0], a[e], b[e])
        return y

    rules = [intercept.Rule("conv", mixture, module_types=(nn.Conv,))]
    with intercept.attach(rules):
        moe = model.init(jax.random.key(0), x)["moe"]
        out = model.apply({"params": params, "moe": moe}, x)
    for n in range(3):
        kernel = params["conv"]["kernel"] + sum(
            weights[n, e] * lora.delta_kernel(downs[e], ups[e], (3, 3, 4, 4)) for e in range(2)
        )
        want = model.apply({"params": {"conv": {**params["conv"], "kernel": kernel}}}, x[n : n + 1])
        np.testing.assert_allclose(out[n : n + 1], want, atol=1e-4, rtol=1e-5)
