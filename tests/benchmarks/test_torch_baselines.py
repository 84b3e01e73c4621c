"""The PyTorch baselines of `benchmarks/compare_torch.py` compute what the flax models compute:
the official NAFNet (custom-autograd LayerNorm2d) and Restormer (einops' rearranges), and the
peft and merged LoRA forms; outputs and gradients, on tiny variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
from benchmarks import common, torch_lora  # noqa: E402  (both import torch)
from ir_lora import models  # noqa: E402
from ir_lora.peft import intercept, lora, partition  # noqa: E402
from tests import torch_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compilation")

RESTORMER_TINY = dict(heads=(2, 2, 2, 2), use_bias=True)


def test_layer_norm_function_backward_is_the_derivative_of_its_forward():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: torch_reference.LayerNormFunction.apply(x, w, b, 1e-6)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_rearranges_are_the_ones_einops_makes():
    einops = pytest.importorskip("einops")
    x = torch.randn(2, 6, 4, 5)
    cases = [
        (torch_reference.to_3d(x), einops.rearrange(x, "b c h w -> b (h w) c")),
        (
            torch_reference.split_heads(x, 3),
            einops.rearrange(x, "b (head c) h w -> b head c (h w)", head=3),
        ),
    ]
    y = einops.rearrange(x, "b c h w -> b (h w) c")
    cases.append(
        (torch_reference.to_4d(y, 4, 5), einops.rearrange(y, "b (h w) c -> b c h w", h=4, w=5))
    )
    heads = einops.rearrange(x, "b (head c) h w -> b head c (h w)", head=3).contiguous()
    cases.append(
        (
            torch_reference.merge_heads(heads, 4, 5),
            einops.rearrange(heads, "b head c (h w) -> b (head c) h w", head=3, h=4, w=5),
        )
    )
    for ours, theirs in cases:
        assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _params(variant, seed=0, **overrides):
    model = models.build(variant, **overrides)
    shapes = intercept.eval_shape_init(model, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    params = common.random_params(shapes["params"], seed)
    # Norm scales 1 and residual scales 0.1 would leave parts of the gradient untested.
    rng = np.random.default_rng(seed + 1)
    return model, jax.tree.map(
        lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params
    )


def _compare_grads(torch_named, flax_tree_torch_keys, rtol=1e-4):
    for name, want in flax_tree_torch_keys.items():
        got = torch_named[name]
        scale = float(np.max(np.abs(want))) + 1e-12
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize(
    "variant,overrides",
    [
        ("nafnet-tiny", {}),
        ("restormer-tiny", RESTORMER_TINY),
        ("restormer-tiny", {**RESTORMER_TINY, "layer_norm_type": "BiasFree", "use_bias": False}),
    ],
)
def test_official_outputs_and_gradients_equal_the_flax_model(variant, overrides):
    model, params = _params(variant, **overrides)
    rng = np.random.default_rng(3)
    # Restormer's latent level has 1/8 of the side: 2x2 pixels here, since over a single pixel
    # the normalised q k^T is constant, its true gradient 0 and either form's only rounding.
    side = 8 if variant.startswith("nafnet") else 16
    images = rng.random((1, side, side, 3), dtype=np.float32)
    weights = rng.standard_normal(images.shape).astype(np.float32)

    def loss(params, x):
        out = model.apply({"params": params}, x)
        return jnp.sum(out * weights), out

    grad_fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    (_, out), (d_params, d_images) = grad_fn(params, images)

    net = torch_lora.official_net(variant, params, **overrides)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    out_t = net(x)
    (out_t * torch.from_numpy(weights.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(
        out_t.detach().numpy().transpose(0, 2, 3, 1), out, atol=1e-5, rtol=1e-4
    )
    _compare_grads({"images": x.grad.numpy().transpose(0, 2, 3, 1)}, {"images": d_images})
    want = models.to_torch(variant, d_params, **overrides)
    _compare_grads({n: p.grad.numpy() for n, p in net.named_parameters()}, want)


def _lora_setup(targets, bias_norm=True):
    model, params = _params("nafnet-tiny")
    sample = jnp.zeros((2, 16, 16, 3))
    config = lora.LoraConfig(targets=targets)
    factors = lora.init_lora(model, config, jax.random.key(0), sample)
    factors = jax.tree.map(lambda v: v + 0.05, factors)  # B != 0
    variables = {"params": params, "lora": factors}
    labels = partition.label_tree(variables, partition.lora_rules(tune_bias_norm=bias_norm))
    trainable, frozen = partition.split(variables, labels)
    return model, config, trainable, frozen


@pytest.mark.parametrize(
    "targets,form",
    [
        ((("(.*/)?conv2", 0), ("(.*/)?norm[^/]*", 0), (".*", 2)), "peft"),
        ((("(.*/)?conv2", 0), ("(.*/)?norm[^/]*", 0), (".*", 2)), "merged"),
        ((("(.*/)?norm[^/]*", 0), (".*", 2)), "merged"),  # depthwise conv2 adapted too
    ],
)
def test_lora_forms_equal_the_flax_adapters(targets, form):
    model, config, trainable, frozen = _lora_setup(targets)
    rng = np.random.default_rng(4)
    images = rng.random((2, 16, 16, 3), dtype=np.float32)
    weights = rng.standard_normal(images.shape).astype(np.float32)

    def apply(trainable, x):
        v = partition.combine(trainable, frozen)
        return lora.apply(model, v["params"], v["lora"], config, x)

    def loss(trainable):
        out = apply(trainable, images)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    params = partition.combine(trainable, frozen)["params"]
    net = torch_lora.official_net("nafnet-tiny", params)
    torch_lora.set_trainable(net, "nafnet-tiny", trainable["params"])
    base_params = dict(net.named_parameters())  # the wrapped layers keep these objects
    wrapped = torch_lora.attach(net, "nafnet-tiny", trainable["lora"], form)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    out_t = net(x)
    (out_t * torch.from_numpy(weights.transpose(0, 3, 1, 2).copy())).sum().backward()
    np.testing.assert_allclose(
        out_t.detach().numpy().transpose(0, 2, 3, 1), out, atol=1e-5, rtol=1e-4
    )
    n_torch = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_torch == sum(x.size for x in jax.tree.leaves(trainable))

    # Factor gradients, brought into each form's layout by the maps that load the factors.
    flat = traverse_util.flatten_dict(grads["lora"])
    for path, key in zip(lora.ranks(grads["lora"]), wrapped, strict=True):
        layer = net.get_submodule(key)
        names = tuple(path.split("/"))
        base = layer.base_layer if form == "peft" else layer.conv
        want_down = torch_lora._down_oihw(np.asarray(flat[(*names, lora.DOWN)]), base)
        want_up = np.asarray(flat[(*names, lora.UP)]).T
        if form == "peft":
            got_down, got_up = layer.lora_A.weight.grad, layer.lora_B.weight.grad[:, :, 0, 0]
        else:
            got_down, got_up = layer.lora_A.grad, layer.lora_B.grad
            want_down = want_down.reshape(want_down.shape[0], -1)
        _compare_grads({"A": got_down.numpy(), "B": got_up.numpy()}, {"A": want_down, "B": want_up})
    # The biases, norms and residual scales train on both sides, with the same gradients.
    rules = models.ARCHITECTURES["nafnet"][1]
    want = {}
    for names, g in traverse_util.flatten_dict(grads["params"]).items():
        key = torch_lora.torch_io.torch_key(names, rules)
        want[key] = np.asarray(g).reshape(base_params[key].shape)
    assert want
    _compare_grads({k: base_params[k].grad.numpy() for k in want}, want)


def test_peft_form_refuses_depthwise_convs():
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    with pytest.raises(ValueError, match="groups=6"):
        torch_lora.PeftConv2d(conv, np.zeros((9, 4), np.float32), np.zeros((4, 6), np.float32), 1.0)
