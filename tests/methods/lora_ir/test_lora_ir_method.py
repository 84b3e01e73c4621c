"""method = lora_ir (LoRA-IR): experts on every conv, routing, DAM, stages, through the backbone."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common, lora_ir_experts, lora_ir_router
from ir_lora import degradations, methods, models, services
from ir_lora.methods import lora_ir
from ir_lora.methods.lora_ir import routing
from ir_lora.peft import intercept
from ir_lora.stages import registry

SHAPE = (3, 16, 16, 3)


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _images(shape=SHAPE, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _random(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), tree)


def _setup(*, route="top1", path="branches", train="experts"):
    config = common.training_config("finetune", "lora_ir")
    config.lora_ir.route, config.lora_ir.path, config.lora_ir.train = route, path, train
    config.lora_ir.top_k = 2
    model = models.build("nafnet-tiny")
    x = _images()
    params = _random(intercept.eval_shape_init(model, x)["params"], 1)
    router = routing.build_router(config.router)
    tree = {
        "params": params,
        "modulation": None,
        "router": router.init(jax.random.key(2), x)["params"],
    }
    adaptation = methods.build(config, model, image_shape=SHAPE)
    trainable, frozen = adaptation.method.init_fn(jax.random.key(0), tree)
    return config, model, x, params, adaptation, trainable, frozen


def test_identity_at_init_and_what_trains():
    config, model, x, params, adaptation, trainable, frozen = _setup()
    assert set(trainable) == {"experts", "modulation"} and set(frozen) == {"params", "router"}
    base = model.apply({"params": params}, x)
    out = jax.jit(adaptation.method.apply_fn)(trainable, frozen, x)
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)
    # Every conv carries E experts; DAM sits on the encoder and middle stages only.
    convs = [p for p, c in intercept.module_paths(model, x).items() if c == "Conv"]
    experts = trainable["experts"]
    flat = {"/".join(k): v for k, v in _flatten(experts).items()}
    assert {k.rsplit("/", 2)[0] for k in flat} == set(convs)
    assert all(v.shape[0] == len(config.lora_ir.classes) for v in flat.values())
    stages = set(trainable["modulation"]) - {lora_ir.PRIOR}
    assert stages == {"encoders_0", "encoders_1", "middle_blks"}


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def test_branches_and_merged_paths_agree_and_batch_one_is_not_special():
    outputs = {}
    for path in ("branches", "merged"):
        _, model, x, params, adaptation, trainable, frozen = _setup(route="soft", path=path)
        trainable = _random(trainable, 3)  # experts and DAM away from their identity init
        apply = jax.jit(adaptation.method.apply_fn)
        outputs[path] = apply(trainable, frozen, x)
        single = apply(trainable, frozen, x[1:2])
        np.testing.assert_allclose(single, outputs[path][1:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["branches"], outputs["merged"], rtol=1e-5, atol=1e-5)
    base = model.apply({"params": params}, x)
    assert float(jnp.abs(outputs["branches"] - base).max()) > 1e-3


def test_routing_selects_each_images_expert():
    """Toy case: logits name a class per image; top-1 runs that expert and nothing else."""
    classes = ("blur", "noise", "rain", "jpeg")
    logits = jnp.full((3, len(degradations.NAMES)), -5.0)
    truth = ["rain", "blur", "jpeg"]
    for n, name in enumerate(truth):
        logits = logits.at[n, degradations.NAMES.index(name)].set(3.0)
    logits = logits.at[:, degradations.NAMES.index("haze")].set(9.0)  # not an expert: ignored
    weights = routing.expert_weights(logits, classes=classes, mode="top1")
    np.testing.assert_array_equal(weights, jax.nn.one_hot([2, 0, 3], 4))
    top2 = routing.expert_weights(logits, classes=classes, mode="topk", k=2)
    np.testing.assert_allclose(jnp.sum(top2, -1), 1.0, rtol=1e-6)
    assert int(jnp.sum(top2 > 0)) == 6
    np.testing.assert_array_equal(routing.predicted_class(logits, classes), [2, 0, 3])

    # Through the backbone: only expert e non-zero; images routed elsewhere are unchanged.
    config, model, x, params, _, trainable, _ = _setup()
    experts = jax.tree.map(lambda v: v, trainable["experts"])
    rng = np.random.default_rng(4)

    def only_expert(leaf_path, v):
        if leaf_path[-1].key != "up":
            return v
        keep = np.zeros(v.shape, np.float32)
        keep[2] = rng.normal(0, 0.2, v.shape[1:])  # expert 2 = "rain"
        return jnp.asarray(keep)

    experts = jax.tree_util.tree_map_with_path(only_expert, experts)
    rules = lora_ir.attach_rules(config.lora_ir, weights=weights, prior=None)
    with intercept.attach(rules):
        out = model.apply({"params": params, "experts": experts}, x)
    base = model.apply({"params": params}, x)
    assert float(jnp.abs(out[0] - base[0]).max()) > 1e-3  # routed to "rain"
    np.testing.assert_allclose(out[1:], base[1:], rtol=1e-5, atol=1e-5)


def test_modulation_widths_scale_with_the_stage():
    """Defaults: the prior keeps the router embedding's width, DAM's MLP is C * dam_ratio."""
    config, model, x, params, adaptation, trainable, frozen = _setup()
    modulation = trainable["modulation"]
    embed = config.router.embed_dim
    assert modulation["degradation_prior"]["dense1"]["kernel"].shape == (embed, embed)
    kernels = jax.tree_util.tree_flatten_with_path(modulation)[0]
    dams = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in kernels
        if "embed_in" in jax.tree_util.keystr(path) and leaf.ndim == 2
    }
    assert dams  # one DAM per encoder stage and the middle stage
    for shape in dams.values():
        embed_out = shape[1]
        assert shape[0] == embed and embed_out in {max(1, round(c * 0.25)) for c in (8, 16, 32)}
    config.lora_ir.dam_hidden = 5
    assert lora_ir.dam_width(config.lora_ir, 64) == 5


def _write(folder, names, rng, size=32):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{name}.png"))


def test_router_then_experts_through_train_and_eval(tmp_path):
    """Router stage, then the experts stage from a plain backbone; checkpoint = trainable only."""
    rng = np.random.default_rng(0)
    _write(tmp_path / "clean", ["a", "b"], rng)
    _write(tmp_path / "mixed" / "val" / "gt", ["noise__x"], rng)
    _write(tmp_path / "mixed" / "val" / "lq", ["noise__x"], rng)

    def tiny(config):
        config.unlock()
        config.data.source_dir = str(tmp_path / "clean")
        config.data.data_dir = str(tmp_path / "tfds")
        config.data.gt_size, config.data.batch_size = 16, 8  # divisible by the 8 test devices
        config.num_train_steps, config.log_every_steps = 2, 1
        config.optimizer.warmup_steps = 0
        config.prod.ops = ("noise", "jpeg")
        config.router.widths = (8, 8)
        config.router.embed_dim = 16
        if "model" in config:  # the router stage has no backbone
            config.model.overrides = {}
            config.model.variant = "nafnet-tiny"
            config.lora_ir.classes = ("noise", "jpeg")
        return config

    router_config = tiny(lora_ir_router.get_config())
    router_config.classes = ("noise", "jpeg")
    router_config.eval_batches = 1
    router_config.lock()
    summary = registry.train(router_config, str(tmp_path / "router"))
    assert 0.0 <= summary["routing_accuracy"] <= 1.0
    written = json.loads((tmp_path / "router" / "router.json").read_text())
    assert written["log"][-1]["step"] == 2
    # eval_every_steps (500) > 2 steps: the last step is still scored.
    assert [a["step"] for a in written["accuracy_log"]] == [2]

    backbone = tmp_path / "backbone"
    model = models.build("nafnet-tiny")
    services.export_params(
        model.init(jax.random.key(0), _images((1, 16, 16, 3)))["params"], backbone
    )
    config = tiny(lora_ir_experts.get_config())
    config.init.checkpoint = str(backbone)
    config.router.checkpoint = str(tmp_path / "router")
    config.checkpoint_every_steps = 2
    config.eval.datasets.mixed.source_dir = str(tmp_path / "mixed")
    config.eval.save_comparisons = False
    config.lock()
    out = registry.train(config, str(tmp_path / "experts"))
    assert (
        out["report"].trainable == out["report"].by_label["lora"] + out["report"].by_label["train"]
    )

    # The checkpoint holds the trainable tree (experts, modulation) and nothing else.
    state_dir = tmp_path / "experts" / "checkpoints" / "2" / "state"
    saved = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    roots = {k.split("'")[3] for k in saved if "trainable" in k}
    assert roots == {"experts", "modulation"}
    assert not any("'params'" in k or "'router'" in k for k in saved)

    again = registry.get(config).evaluate(
        config, workdir=str(tmp_path / "experts"), out_dir=str(tmp_path / "e")
    )
    np.testing.assert_allclose(
        again["datasets"]["mixed"]["mean"]["psnr"],
        out["eval"]["datasets"]["mixed"]["mean"]["psnr"],
        rtol=1e-6,
    )
