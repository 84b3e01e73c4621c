"""method=colora, its stages (contributions, fine-tune) and decoder-only tuning."""

import json
import math
import os
import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import colora as colora_config
from configs import colora_contributions, finetune_decoder
from ir_lora import methods, models, services
from ir_lora.methods.colora import allocate_ranks, files, uniform_rank_for_budget
from ir_lora.methods.colora import stages as colora_stages
from ir_lora.peft import partition
from ir_lora.stages import registry

VARIANT = "nafnet-tiny"


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _size(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _allocation(params):
    # Contributions rising towards the output, as in the paper's real_fig3.
    layers = [p for p in _flat(params) if p.endswith("/kernel")]
    scores = {p.rsplit("/", 1)[0]: 1.0 + (i % 7) for i, p in enumerate(sorted(layers))}
    scores["middle_blks/blocks_0/conv4"] = 0.0  # no contribution: no adapter
    return allocate_ranks(scores, params, budget_fraction=0.2, tolerance=0.05)


def test_colora_trains_the_allocated_adapters_and_bias_norm(tmp_path):
    model = models.build(VARIANT)
    x = np.random.default_rng(0).random((1, 16, 16, 3), np.float32)
    params = model.init(jax.random.key(1), x)["params"]
    allocation = _allocation(params)
    path = files.save_allocation(allocation, str(tmp_path / "ranks.json"), tune_bias_norm=True)
    assert files.load_ranks(path) == allocation.ranks
    assert allocation.ranks["middle_blks/blocks_0/conv4"] == 0

    config = colora_config.get_config()
    config.unlock()
    config.colora.ranks = path
    adaptation = methods.build(config, model, image_shape=x.shape)
    trainable, frozen = adaptation.method.init_fn(jax.random.key(2), params)

    # Exactly the allocation's count: every LoRA factor plus every bias / norm / beta / gamma.
    assert _size(trainable) == allocation.trainable_params
    assert adaptation.report(jax.eval_shape(lambda: params)).trainable == (
        allocation.trainable_params
    )
    lora = trainable["lora"]
    got = {p.rsplit("/", 1)[0]: v.shape[-1] for p, v in _flat(lora).items() if p.endswith("a")}
    assert got == {k: r for k, r in allocation.ranks.items() if r > 0}
    assert not any(p.endswith("kernel") for p in _flat(trainable["params"]))
    assert _size(frozen) == _size(params) - allocation.direct_params
    # B = 0: the adapted model is the pre-trained one at step 0.
    np.testing.assert_allclose(
        adaptation.method.apply_fn(trainable, frozen, x), model.apply({"params": params}, x)
    )


def test_colora_ranks_file_errors_name_the_problem(tmp_path):
    config = colora_config.get_config()
    model = models.build(VARIANT)
    with pytest.raises(ValueError, match="needs config.colora.ranks.*colora stage"):
        methods.build(config, model, image_shape=(1, 8, 8, 3))
    config.unlock()
    config.colora.ranks = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        methods.build(config, model, image_shape=(1, 8, 8, 3))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": files.RANKS_FORMAT, "ranks": {"intro": -1}}))
    config.colora.ranks = str(bad)
    with pytest.raises(ValueError, match="'intro' must be an integer >= 0"):
        methods.build(config, model, image_shape=(1, 8, 8, 3))
    params = models.param_shapes(VARIANT)
    uniform = uniform_rank_for_budget(params, budget_fraction=0.2, tune_bias_norm=False)
    config.colora.ranks = files.save_allocation(
        uniform, str(tmp_path / "u.json"), tune_bias_norm=False
    )
    with pytest.raises(ValueError, match="tune_bias_norm"):
        methods.build(config, model, image_shape=(1, 8, 8, 3))


def test_decoder_only_freezes_encoder_and_middle():
    config = finetune_decoder.get_config()
    model = models.build(VARIANT)
    adaptation = methods.build(config, model, image_shape=(1, 16, 16, 3))
    shapes = jax.eval_shape(adaptation.variables_fn, jax.random.key(0), None)
    labels = _flat(partition.label_tree(shapes, adaptation.rules))
    decoder = re.compile(r"params/(ups_\d+|decoders_\d+|ending)/.*")
    assert labels and all(
        (label == "train") == bool(decoder.fullmatch(path)) for path, label in labels.items()
    )
    assert labels["params/encoders_0/blocks_0/conv1/kernel"] == "frozen"
    assert labels["params/intro/bias"] == "frozen"
    assert labels["params/decoders_1/blocks_0/conv1/kernel"] == "train"
    report = adaptation.report(models.param_shapes(VARIANT))
    assert 0 < report.trainable < report.base

    config.unlock()
    config.full.train_only = (r"params/decoderz_.*",)  # a typo must not freeze everything
    with pytest.raises(ValueError, match="labels no variable"):
        methods.build(config, model, image_shape=(1, 16, 16, 3)).report(
            models.param_shapes(VARIANT)
        )


# ---------------------------------------------------------------------------------------------
# Through train.py's stages, with a tiny backbone and a folder of noisy pairs.


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("colora_task")
    rng = np.random.default_rng(0)
    for split, names in [("train", ["p", "q"]), ("val", ["v"])]:
        for name in names:
            gt = rng.integers(0, 256, (24, 24, 3)).astype(np.int32)
            lq = np.clip(gt + rng.integers(-30, 31, gt.shape), 0, 255)
            for kind, pixels in (("gt", gt), ("lq", lq)):
                os.makedirs(root / "pairs" / split / kind, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    root / "pairs" / split / kind / f"{name}.png"
                )
    model = models.build(VARIANT)
    params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
    # Replicated over every device, as a trainer's export is (orbax restores that sharding).
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    backbone = services.export_params(params, str(root / "backbone"))
    return root, backbone


def _tiny(config, task, tmp_path):
    root, backbone = task
    config.unlock()
    config.model.variant = VARIANT
    config.init.checkpoint = backbone
    config.data.source_dir = str(root / "pairs")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.gt_size = 16
    config.data.batch_size = 8  # divisible by the 8 simulated devices
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval.datasets = {}
    config.colora.budget_fraction = 0.2
    config.colora.tolerance = 0.05
    config.colora.num_batches = 1
    config.colora.faig_steps = 2
    config.colora.probe_steps = 2
    return config


def test_contributions_stage_writes_files_whose_ranks_load_back(task, tmp_path):
    config = _tiny(colora_contributions.get_config(), task, tmp_path)
    config.colora.contribution = "grad_norm"
    out = registry.train(config, str(tmp_path / "ranks"))
    written = out["files"]
    for name in ("contributions.json", "ranks.json", "ranks.txt"):
        assert os.path.isfile(tmp_path / "ranks" / name)
    for name in ("contributions_png", "ranks_png"):
        with Image.open(written[name]) as image:
            assert image.format == "PNG" and image.width > 100
    scores = files.load_scores(written["contributions"])
    assert scores.layers == pytest.approx(out["scores"].layers)
    assert set(scores.stages) >= {"encoder", "middle", "decoder"}
    allocation = out["allocation"]
    assert files.load_ranks(written["ranks"]) == allocation.ranks
    assert set(allocation.ranks) == set(scores.layers)
    assert abs(allocation.trainable_params - allocation.budget_params) <= (
        0.05 * allocation.budget_params
    )


def test_colora_one_command_from_faig_to_adapters_only_checkpoint(task, tmp_path):
    config = _tiny(colora_config.get_config(), task, tmp_path)
    config.lock()
    workdir = tmp_path / "run"
    out = registry.train(config, str(workdir))

    ranks_path = workdir / "colora" / "ranks.json"
    ranks = files.read_ranks_file(str(ranks_path))
    assert ranks["tune_bias_norm"] and out["report"].trainable == ranks["trainable_params"]
    # The probe's full fine-tune leaves no full-size checkpoint behind.
    assert not (workdir / "colora" / "probe" / "checkpoints").exists()
    variables, adaptation, step = services.restore_trained(
        colora_stages.with_ranks(config, str(workdir), compute_missing=False), str(workdir)
    )
    assert step == 2
    trainable, _ = adaptation.method.init_fn(jax.random.key(0), variables["params"])
    assert _size(trainable) == ranks["trainable_params"]
    # The checkpoint's tree (orbax metadata): adapters, biases/norms and their optimizer state;
    # no backbone kernel and no optimizer state of one.
    tree = json.loads((workdir / "checkpoints" / "2" / "state" / "_METADATA").read_text())
    saved = list(tree["tree_metadata"])
    assert any("'lora_a'" in key for key in saved)
    assert not [key for key in saved if key.endswith("'kernel')")]
