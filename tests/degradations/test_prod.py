"""The PROD sampler: labels, orders, count distribution, determinism and the chain it applies."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora import degradations as D


def _config(ops, **overrides):
    c = D.default_config()
    c.ops = list(ops)
    c.max_degradations = len(ops)
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _deterministic_config(mode="random_order"):
    """Three operators with fixed parameters, so the chain can be recomputed outside."""
    c = _config(["blur", "jpeg", "resample"], mode=mode)
    c.blur.p_isotropic = 1.0
    c.blur.sigma = (1.5, 1.5)
    c.blur.support = (9, 9)
    c.jpeg.quality = (20, 20)
    c.resample.factor = (2.0, 2.0)
    c.resample.method_probs = (0.0, 1.0, 0.0)
    return c


_OPS = {
    "blur": jax.jit(lambda x: D.gaussian_blur(None, x, sigma_x=1.5, support=9)),
    "jpeg": jax.jit(lambda x: D.jpeg(x, quality=20)),
    "resample": jax.jit(lambda x: D.resample(None, x, factor=2.0, method=D.BILINEAR)),
}


@pytest.fixture(scope="module")
def sampled():
    """Labels of 480 images under the deterministic 3-operator config, random order."""
    images = jax.random.uniform(jax.random.key(0), (480, 16, 16, 3))
    config = _deterministic_config()
    out, labels = jax.jit(lambda k, x: D.prod(k, x, config))(jax.random.key(1), images)
    return images, out, jax.tree.map(np.asarray, labels)


def test_labels_are_consistent(sampled):
    _, out, labels = sampled
    order, count, present = labels["order"], labels["count"], labels["present"]
    assert order.shape == (480, 3) and order.dtype == np.int32 and present.shape == (480, 8)
    allowed = {D.NAMES.index(n) for n in ("blur", "jpeg", "resample")}
    for o, m, p in zip(order, count, present):
        assert 1 <= m <= 3 and (o[m:] == -1).all() and len(set(o[:m])) == m
        assert set(o[:m]) <= allowed
        np.testing.assert_array_equal(np.flatnonzero(p), sorted(o[:m]))
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_every_order_occurs_and_count_is_uniform(sampled):
    _, _, labels = sampled
    counts = np.bincount(labels["count"], minlength=4)[1:]
    # Uniform{1, 2, 3}: 160 expected each; 4 standard deviations is about +-41.
    assert np.all(np.abs(counts - 160) < 45), counts
    full = [tuple(o) for o, m in zip(labels["order"], labels["count"]) if m == 3]
    seen = {o: full.count(o) for o in set(full)}
    assert set(seen) == set(itertools.permutations(sorted(set(full[0]))))
    assert min(seen.values()) >= 10, seen


def test_output_is_the_chain_the_labels_describe(sampled):
    images, out, labels = sampled
    for i in range(12):
        x = images[i]
        for idx in labels["order"][i][: labels["count"][i]]:
            x = _OPS[D.NAMES[idx]](x)
        np.testing.assert_allclose(out[i], x, atol=2e-3, err_msg=str(labels["order"][i]))


def test_fixed_order_and_single_modes():
    images = jax.random.uniform(jax.random.key(0), (48, 16, 16, 3))
    run = lambda mode: jax.jit(lambda k, x: D.prod(k, x, _deterministic_config(mode))[1])
    fixed = run("fixed_order")(jax.random.key(2), images)
    for o, m in zip(np.asarray(fixed["order"]), np.asarray(fixed["count"])):
        assert list(o[:m]) == sorted(o[:m])  # canonical order blur < jpeg < resample in NAMES
    assert len(set(np.asarray(fixed["count"]).tolist())) == 3
    single = run("single")(jax.random.key(2), images)
    assert (np.asarray(single["count"]) == 1).all()
    assert (np.asarray(single["order"])[:, 1:] == -1).all()
    assert len(set(np.asarray(single["order"])[:, 0].tolist())) == 3


def test_keys_determine_output_and_noise_matches_its_sigma():
    c = _config(["noise", "blur"], min_degradations=1, max_degradations=1)
    c.noise.type_probs = (1.0, 0.0, 0.0)
    c.noise.sigma = (0.05, 0.05)
    c.noise.gaussian_kinds = (1.0, 0.0, 0.0)
    images = jnp.full((32, 32, 32, 3), 0.5)
    run = jax.jit(lambda k: D.prod(k, images, c))
    a, labels = run(jax.random.key(0))
    b, _ = run(jax.random.key(0))
    other, _ = run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, other)
    noisy = np.asarray(labels["order"])[:, 0] == D.NAMES.index("noise")
    assert 5 < noisy.sum() < 27
    np.testing.assert_allclose(np.asarray(a)[noisy].std(), 0.05, rtol=0.03)
    np.testing.assert_allclose(np.asarray(a)[~noisy], 0.5, atol=1e-5)  # blur of a flat image


def test_default_config_and_validation():
    c = D.default_config()
    assert list(c.ops) == ["blur", "motion", "noise", "rain", "jpeg"] and c.mode == "random_order"
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="config.ops"):
        D.prod(jax.random.key(0), x, _config(["blur", "fog"]))
    with pytest.raises(ValueError, match="config.mode"):
        D.prod(jax.random.key(0), x, _config(["blur"], mode="shuffled"))
    with pytest.raises(ValueError, match="max_degradations"):
        D.prod(jax.random.key(0), x, _config(["blur"], max_degradations=2))
    with pytest.raises(ValueError, match="images"):
        D.prod(jax.random.key(0), x[0], _config(["blur"]))


def test_every_operator_in_one_chain():
    """All eight operators, each image degraded by all of them: finite, in range, labelled."""
    c = _config(D.NAMES, min_degradations=8)
    images = jax.random.uniform(jax.random.key(0), (4, 12, 12, 3))
    out, labels = jax.jit(lambda k, x: D.prod(k, x, c))(jax.random.key(3), images)
    out = np.asarray(out)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (np.asarray(labels["present"]) == 1).all()
    assert {tuple(o) for o in np.asarray(labels["order"])} != {tuple(range(8))}
    assert np.abs(out - np.asarray(images)).mean() > 0.02
