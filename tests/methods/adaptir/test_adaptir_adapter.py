"""AdaptIR: zero at init, shapes, finite gradients at zero amplitude, parameter count, and equality
with a PyTorch transcription of the official forward (NCHW, BatchNorm in eval mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir_lora.methods.adaptir import adapter as adaptir
from ir_lora.methods.adaptir.adapter import AdaptIR


def _init(module, x, seed=0):
    init = jax.jit(lambda key, x: module.init(key, x, use_running_average=True))
    return init(jax.random.key(seed, impl="rbg"), x)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_zero_output_at_init_and_shape(norm):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 6, 16)), jnp.float32)
    module = AdaptIR(features=16, hidden=8, reduction=4, norm=norm)

    @jax.jit
    def init_and_apply(key, x):
        variables = module.init(key, x, use_running_average=True)
        return module.apply(variables, x, use_running_average=True)

    y = init_and_apply(jax.random.key(0, impl="rbg"), x)
    assert y.shape == x.shape
    assert np.all(np.asarray(y) == 0.0)


def test_gradients_finite_at_zero_amplitude():
    module = AdaptIR(features=16, hidden=8, reduction=4)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    tail = jnp.asarray(0.1 * rng.normal(size=(1, 1, 8, 16)), jnp.float32)

    @jax.jit
    def grads_at(x):
        params = module.init(jax.random.key(0, impl="rbg"), x)["params"]
        # A non-zero tail and spatial gate so that every branch receives gradient.
        params["tail"]["kernel"] = tail
        params["spatial_gate"]["kernel"] = jnp.full((1, 1, 8, 1), 0.2)
        loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, x)

    inputs = {
        "zeros": jnp.zeros_like(x0),
        "constant": jnp.full_like(x0, 0.7),
        "sparse": x0.at[:, :4].set(0.0),
    }
    for name, x in inputs.items():
        grads = grads_at(x)
        for leaf in jax.tree.leaves(grads):
            assert np.all(np.isfinite(np.asarray(leaf))), name
        if name == "constant":
            # One non-zero coefficient per channel; its gradient must not vanish.
            assert float(jnp.abs(grads[0]["amp_scale"]).sum()) > 0


def test_safe_polar_matches_abs_and_angle():
    f = jnp.array([3 + 4j, -1 + 0j, 0j, 1e-3j, -2 - 2j], dtype=jnp.complex64)
    mag, pha = adaptir.safe_polar(f, 1e-6)
    np.testing.assert_allclose(mag, np.abs(np.asarray(f)), rtol=1e-6)
    np.testing.assert_allclose(pha, np.angle(np.asarray(f)), rtol=1e-6)


@pytest.mark.parametrize("norm", adaptir.NORMS)
def test_param_count_formula_matches_module(norm):
    module = AdaptIR(features=576, hidden=24, reduction=8, norm=norm)
    shapes = jax.eval_shape(lambda x: _init(module, x), jnp.zeros((1, 16, 16, 576)))
    counted = _count(shapes["params"])
    assert counted == adaptir.param_count(576, 24, reduction=8, norm=norm)
    # The official IPT adapter (d=576, gamma=24, BatchNorm): 29,069 parameters.
    if norm != "none":
        assert counted == 29_069
    if norm == "batch":
        assert _count(shapes["batch_stats"]) == 2 * 24
    # EDT: d=180, h=12, R=6, reduction 4: 4,817.
    assert adaptir.param_count(180, 12, reduction=4, norm="batch") == 4_817
    # Below the reduction the channel gate keeps one channel (small backbones' default widths).
    small = AdaptIR(features=16, hidden=2, reduction=4, norm=norm)
    shapes = jax.eval_shape(lambda x: _init(small, x), jnp.zeros((1, 8, 8, 16)))
    assert _count(shapes["params"]) == adaptir.param_count(16, 2, reduction=4, norm=norm)


def test_bad_input_names_shape():
    module = AdaptIR(features=16, hidden=8, reduction=4)
    with pytest.raises(ValueError, match=r"\(N, H, W, 16\).*\(2, 8, 8, 12\)"):
        _init(module, jnp.zeros((2, 8, 8, 12)))


def _torch_reference(params, stats, x_nhwc):
    """The official forward (BatchNorm in eval mode), written in PyTorch from METHODS.md b.2."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    oihw = lambda k: t(k).permute(3, 2, 0, 1)  # HWIO -> OIHW
    x = t(x_nhwc).permute(0, 3, 1, 2)
    n, _, height, width = x.shape
    p = params
    z = f.conv2d(x, oihw(p["head"]["kernel"]), t(p["head"]["bias"]))
    z = f.batch_norm(
        z, t(stats["norm"]["mean"]), t(stats["norm"]["var"]), t(p["norm"]["scale"]),
        t(p["norm"]["bias"]), training=False, eps=1e-5,
    )  # fmt: skip
    hidden = z.shape[1]
    spec = torch.fft.rfft2(z, dim=(2, 3), norm="ortho")
    mag = torch.abs(spec) * t(p["amp_scale"])[:, None, None] + t(p["amp_bias"])[:, None, None]
    pha = torch.angle(spec) * t(p["pha_scale"])[:, None, None] + t(p["pha_bias"])[:, None, None]
    spec = torch.complex(mag * torch.cos(pha), mag * torch.sin(pha))
    glob = torch.abs(torch.fft.irfft2(spec, s=(height, width), dim=(2, 3), norm="ortho"))
    kernel = (t(p["conv_weight_A"]) @ t(p["conv_weight_B"])).view(hidden, 1, 3, 3)
    local = f.conv2d(z, kernel, t(p["conv_bias"]), padding=1, groups=hidden)
    score = f.conv2d(z, oihw(p["compress"]["kernel"]), t(p["compress"]["bias"]))
    score = f.softmax(score.view(n, 1, height * width).permute(0, 2, 1), dim=1)
    pooled = (z.view(n, hidden, height * width) @ score)[..., 0]
    c = f.gelu(pooled @ t(p["proj_in"]["kernel"]) + t(p["proj_in"]["bias"]))
    c = c @ t(p["proj_out"]["kernel"]) + t(p["proj_out"]["bias"])
    g = f.adaptive_avg_pool2d(glob, 1)
    g = f.gelu(f.conv2d(g, oihw(p["channel_gate_in"]["kernel"]), t(p["channel_gate_in"]["bias"])))
    g_c = torch.sigmoid(
        f.conv2d(g, oihw(p["channel_gate_out"]["kernel"]), t(p["channel_gate_out"]["bias"]))
    )
    g_s = torch.sigmoid(
        f.conv2d(local, oihw(p["spatial_gate"]["kernel"]), t(p["spatial_gate"]["bias"]))
    )
    mixed = c[:, :, None, None] * (g_c * local + g_s * glob)
    out = f.conv2d(mixed, oihw(p["tail"]["kernel"]))
    return out.permute(0, 2, 3, 1).numpy()


def test_matches_torch_transcription_of_official_forward():
    module = AdaptIR(features=12, hidden=8, reduction=4, norm="batch")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 6, 10, 12)), jnp.float32)
    variables = _init(module, x)
    # Perturb every parameter (including the zero-init ones) and the running statistics.
    variables = jax.tree.map(
        lambda v: jnp.asarray(v + 0.3 * rng.normal(size=v.shape), jnp.float32), variables
    )
    variables["batch_stats"]["norm"]["var"] = 1.0 + jnp.abs(variables["batch_stats"]["norm"]["var"])
    y = jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))(variables, x)
    want = _torch_reference(variables["params"], variables["batch_stats"], x)
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=1e-4)


def test_negative_real_bins_have_phase_plus_pi():
    # Alternating signs put energy on the Nyquist bins; a negative mean on DC.
    h, w = 4, 6
    z = -1.0 + 0.5 * ((-1.0) ** (np.arange(h)[:, None] + np.arange(w)[None, :]))
    z = jnp.asarray(z, jnp.float32)[None, :, :, None] * jnp.ones((1, 1, 1, 3))
    spectrum = jnp.fft.rfft2(z, axes=(1, 2), norm="ortho")
    _, phase = adaptir.safe_polar(spectrum, 1e-6, (h, w))
    assert float(phase[0, 0, 0, 0]) == pytest.approx(np.pi)
    assert float(phase[0, h // 2, w // 2, 0]) == 0.0  # +0.5 * sqrt(h*w) on the Nyquist bin
