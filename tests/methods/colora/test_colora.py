"""CoLoRA core: FAIG and gradient-norm contributions, their reductions, rank allocation, charts."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ir_lora.methods import colora
from ir_lora.methods.colora import plot

# ---------------------------------------------------------------------------------------------
# A tiny NAFNet-shaped conv net: dense 3x3, depthwise 3x3, 1x1, biases, LayerNorms, a variable.


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm1")(x)
        h = nn.Conv(self.features, (1, 1), name="conv1")(h)
        h = nn.Conv(self.features, (3, 3), feature_group_count=self.features, name="conv2")(h)
        h = nn.Conv(self.features, (1, 1), use_bias=False, name="conv3")(jnp.tanh(h))
        beta = self.param("beta", nn.initializers.constant(0.5), (self.features,))
        return x + h * beta


class Stage(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return Block(self.features, name="blocks_0")(x)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="intro")(x)
        h = Stage(4, name="encoders_0")(h)
        h = Stage(4, name="middle_blks")(h)
        h = Stage(4, name="decoders_0")(h)
        return nn.Conv(3, (3, 3), name="ending")(h) + x


MODEL = TinyNet()
APPLY = lambda p, x: MODEL.apply({"params": p}, x)
LOSS = colora.sum_squared_error(APPLY)


@functools.cache
def _setup(num_batches=1, batch_size=2, size=6):
    """Params, a perturbed "fine-tuned" copy, and `(num_batches, batch_size)` image pairs.

    Drawn with numpy: XLA:CPU compiles jax.random's threefry for every leaf, which took tens of
    seconds on the shared 2-core test host.
    """
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    draw = lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32)
    base = jax.tree.map(draw, shapes["params"])
    tuned = jax.tree.map(lambda x: x + 0.05 * draw(x).astype(np.float32) / 0.3, base)
    gt = rng.uniform(size=(num_batches, batch_size, size, size, 3)).astype(np.float32)
    lq = gt + 0.1 * rng.standard_normal(gt.shape).astype(np.float32)
    to_jax = lambda t: jax.tree.map(jnp.asarray, t)
    return to_jax(base), to_jax(tuned), to_jax({"lq": lq, "gt": gt})


def _reference_faig(base, tuned, batches, steps, per_image):
    """The official loop written out: one image (or batch) at a time, one alpha at a time."""
    grad_fn = jax.jit(jax.grad(LOSS))
    base_np = jax.tree.map(np.asarray, base)
    tuned_np = jax.tree.map(np.asarray, tuned)
    num_batches, batch_size = batches["gt"].shape[:2]
    units = []
    for b in range(num_batches):
        if per_image:
            units += [{k: v[b, i : i + 1] for k, v in batches.items()} for i in range(batch_size)]
        else:
            units.append({k: v[b] for k, v in batches.items()})
    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), base_np)
    for unit in units:
        acc = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), base_np)
        for s in range(steps):
            alpha = s / steps
            point = jax.tree.map(lambda b, t, a=alpha: a * b + (1 - a) * t, base_np, tuned_np)
            g = grad_fn(jax.tree.map(jnp.asarray, point), unit)
            acc = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64), acc, g)
        ig = jax.tree.map(lambda b, t, a: np.abs((b - t) * a / steps), base_np, tuned_np, acc)
        total = jax.tree.map(np.add, total, ig)
    return jax.tree.map(lambda t: t / len(units), total)


def _assert_trees_close(actual, expected, rtol=2e-4):
    flat_a = traverse_util.flatten_dict(actual, sep="/")
    flat_e = traverse_util.flatten_dict(expected, sep="/")
    assert flat_a.keys() == flat_e.keys()
    scale = max(float(np.max(np.abs(v))) for v in flat_e.values())
    for path in flat_e:
        np.testing.assert_allclose(
            flat_a[path], flat_e[path], rtol=rtol, atol=rtol * scale, err_msg=path
        )


@pytest.mark.parametrize("per_image", [True, False])
def test_faig_matches_a_python_loop(per_image):
    base, tuned, batches = _setup()
    steps = 3
    got = colora.faig(LOSS, base, tuned, batches, steps=steps, per_image=per_image)
    want = _reference_faig(base, tuned, batches, steps, per_image)
    _assert_trees_close(got, want)
    assert all(float(np.sum(x)) > 0 for x in jax.tree.leaves(got))


def test_faig_is_zero_for_a_layer_that_did_not_change():
    base, tuned, batches = _setup()
    tuned = jax.tree.map(lambda x: x, tuned)
    tuned["middle_blks"]["blocks_0"]["conv1"] = base["middle_blks"]["blocks_0"]["conv1"]
    got = colora.faig(LOSS, base, tuned, batches, steps=3)
    unchanged = got["middle_blks"]["blocks_0"]["conv1"]
    assert float(jnp.abs(unchanged["kernel"]).max()) == 0.0
    assert float(jnp.abs(unchanged["bias"]).max()) == 0.0
    assert float(jnp.abs(got["middle_blks"]["blocks_0"]["conv2"]["kernel"]).max()) > 0.0


def test_faig_quadratic_loss_has_the_analytic_riemann_sum():
    # L(theta; x) = 0.5 * sum(w * (theta - x)^2): grad = w (theta - x), linear along the path, so
    # mean_s grad = w * (mean_s(alpha_s) (base - tuned) + tuned - x), mean_s alpha_s = (M-1)/(2M).
    rng = np.random.default_rng(0)
    base = {"a": {"kernel": rng.normal(size=(2, 3))}, "b": {"bias": rng.normal(size=(3,))}}
    tuned = {"a": {"kernel": rng.normal(size=(2, 3))}, "b": {"bias": rng.normal(size=(3,))}}
    w = {"a": {"kernel": rng.uniform(0.5, 2, (2, 3))}, "b": {"bias": rng.uniform(0.5, 2, (3,))}}
    xs = {"a": rng.normal(size=(2, 3, 2, 3)), "b": rng.normal(size=(2, 3, 3))}  # 2 batches of 3

    def loss(params, batch):
        terms = [
            0.5 * jnp.sum(w[name][leaf] * (params[name][leaf] - batch[name]) ** 2)
            for name, leaf in (("a", "kernel"), ("b", "bias"))
        ]
        return sum(terms)

    steps = 7
    to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    got = colora.faig(loss, to32(base), to32(tuned), to32(xs), steps=steps)
    mean_alpha = (steps - 1) / (2 * steps)
    for name, leaf in (("a", "kernel"), ("b", "bias")):
        diff = base[name][leaf] - tuned[name][leaf]
        x = xs[name].reshape((6,) + xs[name].shape[2:])
        per_image = np.abs(diff * w[name][leaf] * (mean_alpha * diff + tuned[name][leaf] - x))
        np.testing.assert_allclose(got[name][leaf], per_image.mean(axis=0), rtol=1e-5)


def test_faig_sharded_over_the_batch_equals_unsharded():
    devices = np.array(jax.devices())
    base, tuned, batches = _setup(num_batches=1, batch_size=len(devices))
    want = colora.faig(LOSS, base, tuned, batches, steps=2)
    mesh = Mesh(devices, ("data",))
    sharded = jax.device_put(batches, NamedSharding(mesh, P(None, "data")))
    replicated = NamedSharding(mesh, P())
    got = colora.faig(
        LOSS,
        jax.device_put(base, replicated),
        jax.device_put(tuned, replicated),
        sharded,
        steps=2,
    )
    _assert_trees_close(jax.device_get(got), jax.device_get(want), rtol=1e-5)


def test_faig_rejects_batches_without_a_batch_axis():
    base, tuned, _ = _setup()
    with pytest.raises(ValueError, match="num_batches, batch_size"):
        colora.faig(LOSS, base, tuned, {"lq": jnp.zeros((6,)), "gt": jnp.zeros((6,))}, steps=2)


@pytest.mark.parametrize("rms", [False, True])
def test_grad_norm_matches_a_hand_loop(rms):
    base, _, batches = _setup(num_batches=3)
    got = colora.grad_norm(LOSS, base, batches, rms=rms)
    grad_fn = jax.jit(jax.grad(LOSS))
    norms = []
    for b in range(3):
        g = grad_fn(base, {k: v[b] for k, v in batches.items()})
        norms.append(
            jax.tree.map(
                lambda x: (
                    np.sqrt(np.sum(np.asarray(x, np.float64) ** 2))
                    / (np.sqrt(x.size) if rms else 1.0)
                ),
                g,
            )
        )
    want = jax.tree.map(lambda *n: np.mean(n), *norms)
    _assert_trees_close(got, want, rtol=1e-5)


def test_per_filter_and_layer_scores_reduce_as_documented():
    base, tuned, batches = _setup()
    ig = jax.device_get(colora.faig(LOSS, base, tuned, batches, steps=3))
    kernel = np.asarray(ig["encoders_0"]["blocks_0"]["conv1"]["kernel"], np.float64)  # 1,1,4,4
    filters = colora.per_filter(ig)
    np.testing.assert_allclose(
        filters["encoders_0"]["blocks_0"]["conv1"]["kernel"], kernel.sum(axis=(0, 1, 2))
    )
    slices = colora.per_filter(ig, filter="kernel_slice")["intro"]["kernel"]
    assert slices.shape == (3 * 4,)
    np.testing.assert_allclose(slices.sum(), np.sum(ig["intro"]["kernel"]), rtol=1e-6)

    scores = colora.layer_scores(ig)
    flat = traverse_util.flatten_dict(ig, sep="/")
    kernels = {p.rsplit("/", 1)[0]: v for p, v in flat.items() if p.endswith("kernel")}
    assert list(scores.layers) == list(kernels)
    for path, value in kernels.items():  # mean over output-channel filters
        assert scores.layers[path] == pytest.approx(np.sum(value) / value.shape[-1], rel=1e-6)

    def pooled(paths):
        return sum(float(np.sum(flat[p])) for p in paths) / sum(
            flat[p].shape[-1] if flat[p].ndim >= 2 else flat[p].size for p in paths
        )

    members = {
        "Norm": [p for p in flat if "/norm1/" in p],
        "Conv": [p for p in flat if p.endswith("kernel")],
        "Bias": [p for p in flat if p.endswith("bias") and "/norm1/" not in p],
        "Variables": [p for p in flat if p.endswith("beta")],
    }
    assert set(scores.groups) == set(members)
    for group, paths in members.items():
        assert scores.groups[group] == pytest.approx(pooled(paths), rel=1e-6), group

    assert list(scores.blocks) == [
        "decoders_0/blocks_0",
        "encoders_0/blocks_0",
        "ending",
        "intro",
        "middle_blks/blocks_0",
    ]
    assert scores.block_stage == {
        "decoders_0/blocks_0": "decoder",
        "encoders_0/blocks_0": "encoder",
        "ending": "decoder",
        "intro": "encoder",
        "middle_blks/blocks_0": "middle",
    }
    encoder = [p for p in flat if p.startswith(("intro/", "encoders_0/"))]
    assert scores.stages["encoder"] == pytest.approx(pooled(encoder), rel=1e-6)
    summed = colora.layer_scores(ig, reduce="sum")
    assert summed.stages["middle"] == pytest.approx(
        sum(float(np.sum(v)) for p, v in flat.items() if p.startswith("middle_blks/")), rel=1e-6
    )


def test_layer_scores_of_grad_norm_are_the_leaf_norms():
    base, _, batches = _setup(num_batches=3)
    norms = jax.device_get(colora.grad_norm(LOSS, base, batches))
    scores = colora.layer_scores(norms)
    assert scores.layers["intro"] == pytest.approx(float(norms["intro"]["kernel"]))
    flat = traverse_util.flatten_dict(norms, sep="/")
    assert scores.leaves == pytest.approx({p: float(v) for p, v in flat.items()})
    bias = [float(v) for p, v in flat.items() if p.endswith("bias") and "norm1" not in p]
    assert scores.groups["Bias"] == pytest.approx(np.mean(bias))


# ---------------------------------------------------------------------------------------------
# Rank allocation, on NAFNet-sized shapes (no arrays: ShapeDtypeStructs).


def _big_params():
    shapes = {}
    for j in range(8):  # eight equal dense 3x3 layers, plus 1x1, depthwise and 2x2 stride convs
        shapes[f"encoders_0/blocks_{j}/conv3x3"] = (3, 3, 64, 64)
        shapes[f"encoders_0/blocks_{j}/conv1"] = (1, 1, 64, 128)
        shapes[f"encoders_0/blocks_{j}/conv2"] = (3, 3, 1, 128)
        shapes[f"encoders_0/blocks_{j}/conv10"] = (1, 1, 128, 64)
    shapes["downs_0"] = (2, 2, 64, 128)
    params = {}
    for path, shape in shapes.items():
        params[path + "/kernel"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        params[path + "/bias"] = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    params["encoders_0/blocks_0/norm1/scale"] = jax.ShapeDtypeStruct((64,), jnp.float32)
    return traverse_util.unflatten_dict(params, sep="/"), list(shapes)


def _scores(paths, seed=0):
    rng = np.random.default_rng(seed)
    return {p: float(v) for p, v in zip(paths, rng.uniform(1e-6, 1e-3, len(paths)))}


def _count(params):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("rule", ["delta", "proportional"])
@pytest.mark.parametrize("normalize", ["max", "minmax"])
def test_allocate_ranks_meets_the_budget_and_is_monotone(rule, normalize):
    params, paths = _big_params()
    scores = _scores(paths)
    out = colora.allocate_ranks(scores, params, rule=rule, normalize=normalize)
    backbone = _count(params)
    assert out.backbone_params == backbone
    assert out.budget_params == round(0.07 * backbone)
    assert abs(out.trainable_params - out.budget_params) <= 0.01 * out.budget_params
    direct = sum(math.prod(x.shape) for p, x in _flat(params).items() if not p.endswith("kernel"))
    assert out.direct_params == direct
    assert out.lora_params == sum(
        row.rank * (row.shape[-1] + math.prod(row.shape[:-1])) for row in out.rows
    )
    equal = [row for row in out.rows if row.path.endswith("conv3x3")]
    by_score = sorted(equal, key=lambda row: row.score)
    assert [r.rank for r in by_score] == sorted(r.rank for r in by_score)
    assert by_score[-1].rank > by_score[0].rank
    assert min(row.rank for row in out.rows) == 0  # weakest layers get no adapter
    assert out == colora.allocate_ranks(scores, params, rule=rule, normalize=normalize)


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def test_delta_rule_follows_the_formula():
    params, paths = _big_params()
    scores = _scores(paths, seed=1)
    out = colora.allocate_ranks(scores, params, beta=0.01, budget_fraction=0.1)
    top = max(scores.values())
    for row in out.rows:
        d, k = row.shape[-1], math.prod(row.shape[:-1])
        delta = min(max(out.knob * scores[row.path] / top + 0.01, 0.0), 1.0)
        assert row.delta == pytest.approx(delta)
        assert row.rank == math.floor(delta * d * k / (d + k) + 0.5)
    assert abs(out.trainable_params - out.budget_params) <= 0.01 * out.budget_params


def test_targets_are_anchored_exact_paths():
    params, paths = _big_params()
    out = colora.allocate_ranks(_scores(paths), params, tune_bias_norm=False)
    assert [p for p, _ in out.targets] == [f"^{re.escape(p)}$" for p in paths]
    conv1 = dict(out.targets)["^encoders_0/blocks_0/conv1$"]
    assert conv1 == out.ranks["encoders_0/blocks_0/conv1"]
    matching = [p for p, _ in out.targets if re.fullmatch(p, "encoders_0/blocks_0/conv1")]
    assert matching == ["^encoders_0/blocks_0/conv1$"]  # not conv10
    assert out.direct_params == 0
    table = out.table()
    assert all(p in table for p in paths) and "trainable" in table


def test_impossible_budgets_raise_clear_errors():
    params, paths = _big_params()
    scores = _scores(paths)
    with pytest.raises(ValueError, match="below the floor"):
        colora.allocate_ranks(scores, params, budget_fraction=0.001)
    with pytest.raises(ValueError, match="above the maximum"):
        colora.allocate_ranks(scores, params, budget_fraction=1.5)
    with pytest.raises(ValueError, match="not adaptable kernels"):
        colora.allocate_ranks({"nope/conv": 1.0}, params)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        colora.allocate_ranks(scores, params, beta=-0.1)
    with pytest.raises(ValueError, match="finite"):
        colora.allocate_ranks({**scores, "downs_0": float("nan")}, params)
    with pytest.raises(ValueError, match="within"):  # one layer: rank steps of 1,088 params
        colora.allocate_ranks({"downs_0": 1.0}, params, budget_params=1500, tune_bias_norm=False)


def test_uniform_rank_is_the_closest_equal_rank():
    params, paths = _big_params()
    out = colora.uniform_rank_for_budget(params)
    rank = int(out.knob)
    assert {row.rank for row in out.rows if row.path.endswith("conv3x3")} == {rank}
    caps = [
        math.floor(s[-1] * math.prod(s[:-1]) / (s[-1] + math.prod(s[:-1])) + 0.5)
        for s in (row.shape for row in out.rows)
    ]
    assert [row.rank for row in out.rows] == [min(rank, c) for c in caps]

    def total(r):
        lora = sum(
            min(r, c) * (row.shape[-1] + math.prod(row.shape[:-1]))
            for c, row in zip(caps, out.rows)
        )
        return lora + out.direct_params

    assert total(rank) == out.trainable_params
    gap = abs(total(rank) - out.budget_params)
    assert gap <= abs(total(rank + 1) - out.budget_params)
    assert gap <= abs(total(rank - 1) - out.budget_params)


def test_faig_to_ranks_end_to_end_on_the_tiny_net(tmp_path):
    base, tuned, batches = _setup()
    scores = colora.layer_scores(colora.faig(LOSS, base, tuned, batches, steps=3))
    out = colora.allocate_ranks(scores.layers, base, budget_fraction=0.5, tolerance=0.1)
    assert set(out.ranks) == set(colora.adaptable_layers(base))
    assert abs(out.trainable_params - out.budget_params) <= 0.1 * out.budget_params

    blocks = plot.plot_block_contributions(scores, str(tmp_path / "charts" / "blocks.png"))
    ranks = plot.plot_ranks(out, str(tmp_path / "ranks.png"), layer_stage=plot.layer_stages(scores))
    for path in (blocks, ranks):
        with open(path, "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert plot.layer_stages(scores)["middle_blks/blocks_0/conv2"] == "middle"


def test_forward_order_of_blocks():
    stage = {
        "intro": "encoder",
        "encoders_0/blocks_10": "encoder",
        "encoders_0/blocks_2": "encoder",
    }
    stage |= {
        "middle_blks/blocks_0": "middle",
        "ending": "decoder",
        "decoders_0/blocks_0": "decoder",
    }
    names = sorted(stage)
    assert plot.forward_order(names, stage) == [
        "encoders_0/blocks_2",
        "encoders_0/blocks_10",
        "intro",
        "middle_blks/blocks_0",
        "decoders_0/blocks_0",
        "ending",
    ]
    calls = ["intro", "encoders_0/blocks_2/conv1", "encoders_0/blocks_10/conv1"]
    calls += ["middle_blks/blocks_0/conv1", "decoders_0/blocks_0/conv1", "ending"]
    assert plot.forward_order(names, stage, calls) == [
        "intro",
        "encoders_0/blocks_2",
        "encoders_0/blocks_10",
        "middle_blks/blocks_0",
        "decoders_0/blocks_0",
        "ending",
    ]
