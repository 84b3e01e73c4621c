"""Trainability rules, split/combine and a LoRA training run on a model defined here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from ir_lora.peft import intercept, lora, partition, report
from ir_lora.peft.lora import LoraConfig

pytestmark = pytest.mark.usefixtures("fast_compilation")


class TinyRestorer(nn.Module):
    """A residual conv net written without any knowledge of LoRA."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        h = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(h)
        h = nn.LayerNorm(name="norm")(h)
        beta = self.param("beta", nn.initializers.zeros, (1, 1, 1, 3))
        return x + (1 + beta) * nn.Conv(3, (1, 1), name="out")(h)


def _setup():
    model = TinyRestorer()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    config = LoraConfig(targets=(("norm", 0), ("conv1|dw|out", 2)), alpha=2.0)
    shapes = intercept.eval_shape_init(model, x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    factors = lora.init_lora(model, config, jax.random.key(1), x)
    return model, x, config, {"params": params, "lora": factors}


def test_lora_rules_labels():
    *_, variables = _setup()
    labels = traverse_util.flatten_dict(
        partition.label_tree(variables, partition.lora_rules()), sep="/"
    )
    assert labels["lora/conv1/lora_a"] == "lora"
    assert labels["lora/dw/lora_b"] == "lora"
    assert labels["params/conv1/bias"] == "train"
    assert labels["params/norm/scale"] == "train"
    assert labels["params/beta"] == "train"
    assert labels["params/conv1/kernel"] == "frozen"
    assert labels["params/dw/kernel"] == "frozen"
    no_bias = traverse_util.flatten_dict(
        partition.label_tree(variables, partition.lora_rules(tune_bias_norm=False)), sep="/"
    )
    assert no_bias["params/conv1/bias"] == "frozen" and no_bias["lora/out/lora_a"] == "lora"
    dw_full = traverse_util.flatten_dict(
        partition.label_tree(variables, partition.lora_rules(also_train=["params/dw/kernel"])),
        sep="/",
    )
    assert dw_full["params/dw/kernel"] == "train" and dw_full["params/out/kernel"] == "frozen"
    full = partition.label_tree(variables, partition.full_rules(with_lora=True))
    assert set(jax.tree.leaves(full["params"])) == {"train"}
    assert set(jax.tree.leaves(full["lora"])) == {"lora"}


def test_unmatched_leaf_is_named():
    *_, variables = _setup()
    with pytest.raises(ValueError, match="'lora/conv1/lora_a'"):
        partition.label_tree(variables, [("params/.*", "frozen")])


def test_unused_rule_is_named():
    *_, variables = _setup()
    rules = [("lora/.*", "lora"), ("params/.*/kernal", "frozen"), ("params/.*", "frozen")]
    with pytest.raises(ValueError, match="kernal"):
        partition.label_tree(variables, rules)


def test_shadowed_rule_is_named_with_the_rule_that_shadows_it():
    *_, variables = _setup()
    rules = [("lora/.*", "lora"), ("params/.*", "frozen"), ("params/.*/bias", "train")]
    with pytest.raises(ValueError, match=r"'params/\.\*/bias'.*earlier rules \['params/\.\*'\]"):
        partition.label_tree(variables, rules)


def test_rule_listed_twice_is_named():
    *_, variables = _setup()
    rules = [("lora/.*", "lora"), ("params/.*", "frozen"), ("lora/.*", "train")]
    with pytest.raises(ValueError, match=r"'lora/\.\*' is listed more than once"):
        partition.label_tree(variables, rules)


def test_split_combine_round_trip_and_disjointness():
    *_, variables = _setup()
    labels = partition.label_tree(variables, partition.lora_rules())
    trainable, frozen = partition.split(variables, labels)
    flat_t = traverse_util.flatten_dict(trainable, sep="/")
    flat_f = traverse_util.flatten_dict(frozen, sep="/")
    assert not flat_t.keys() & flat_f.keys()
    assert set(flat_f) == {"params/conv1/kernel", "params/dw/kernel", "params/out/kernel"}
    back = partition.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    with pytest.raises(ValueError, match="both trainable and frozen"):
        partition.combine(variables, frozen)


def test_make_optimizer_errors_name_the_label():
    *_, variables = _setup()
    labels = partition.label_tree(variables, partition.lora_rules())
    trainable_labels, _ = partition.split(labels, labels)
    with pytest.raises(ValueError, match=r"\['train'\]"):
        partition.make_optimizer({"lora": optax.adam(1e-3)}, trainable_labels)
    with pytest.raises(ValueError, match="frozen"):
        partition.make_optimizer({"lora": optax.sgd(1.0), "train": optax.sgd(1.0)}, labels)


def test_lora_training_touches_only_trainable_leaves():
    model, x, config, variables = _setup()
    target = jnp.flip(x, axis=2) * 0.5  # something the frozen model does not do
    labels = partition.label_tree(variables, partition.lora_rules(tune_bias_norm=True))
    trainable, frozen = partition.split(variables, labels)
    trainable_labels, _ = partition.split(labels, labels)
    tx = partition.make_optimizer(
        {"lora": optax.adam(3e-2), "train": optax.sgd(1e-2)}, trainable_labels
    )
    opt_state = tx.init(trainable)

    def loss_fn(trainable, frozen, x, target):
        with lora.interceptor(config):
            pred = model.apply(partition.combine(trainable, frozen), x)
        return jnp.mean((pred - target) ** 2)

    @jax.jit
    def step(trainable, opt_state, frozen, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, target)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grads

    frozen_before = jax.tree.map(np.array, frozen)
    losses = []
    for _ in range(15):
        trainable, opt_state, loss, grads = step(trainable, opt_state, frozen, x, target)
        losses.append(float(loss))
    # Gradients exist for exactly the trainable tree; the frozen tree is an ordinary argument.
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert losses[-1] < 0.8 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    # Optimizer state: Adam moments (mu, nu) for the "lora" leaves, nothing for frozen kernels.
    flat_labels = traverse_util.flatten_dict(trainable_labels, sep="/")
    flat_trainable = traverse_util.flatten_dict(trainable, sep="/")
    lora_sizes = sum(v.size for k, v in flat_trainable.items() if flat_labels[k] == "lora")
    state_arrays = [a for a in jax.tree.leaves(opt_state) if a.ndim > 0]
    assert sum(a.size for a in state_arrays) == 2 * lora_sizes
    frozen_shapes = {v.shape for v in jax.tree.leaves(frozen)}
    lora_shapes = {v.shape for k, v in flat_trainable.items() if flat_labels[k] == "lora"}
    assert {a.shape for a in state_arrays} == lora_shapes
    assert not (frozen_shapes - lora_shapes) & {a.shape for a in state_arrays}


def test_report_counts():
    *_, variables = _setup()
    labels = partition.label_tree(variables, partition.lora_rules())
    rep = report.parameter_report(variables, labels)
    n = lambda tree: sum(v.size for v in jax.tree.leaves(tree))  # noqa: E731
    assert rep.total == n(variables)
    assert rep.base == n(variables["params"])
    assert rep.adapter == n(variables["lora"])
    assert rep.trainable + rep.frozen == rep.total
    frozen_kernels = 3 * 3 * 3 * 8 + 3 * 3 * 1 * 8 + 8 * 3
    assert rep.frozen == frozen_kernels
    assert {row.path: row.rank for row in rep.layers} == {"conv1": 2, "dw": 2, "out": 2}
    described = partition.describe(variables, partition.lora_rules())
    assert ("params/conv1/kernel", "frozen", "params/.*") in described
    assert ("lora/dw/lora_b", "lora", "lora/.*") in described
    text = rep.to_markdown()
    assert "conv1" in text and f"{rep.trainable:,}" in text
