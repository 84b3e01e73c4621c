"""The pretrain and finetune stages end to end, as train.py / eval.py run them: pretrain,
export, LoRA, eval; the stage and method registries."""

import json
import os

import jax
import numpy as np
import pytest
import tiny_training
from PIL import Image

from configs import common, finetune_lora, pretrain_prod
from ir_lora import checkpointing, methods, models, services
from ir_lora.peft import partition
from ir_lora.stages import registry, training


def _write_images(folder, names, rng, size=40):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{name}.png"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    _write_images(root / "clean", ["a", "b", "c"], rng)
    for split, names in [("train", ["p", "q"]), ("val", ["v"])]:
        _write_images(root / "pairs" / split / "gt", names, rng)
        for name in names:
            gt = np.asarray(Image.open(root / "pairs" / split / "gt" / f"{name}.png"), np.int32)
            noisy = np.clip(gt + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
            os.makedirs(root / "pairs" / split / "lq", exist_ok=True)
            Image.fromarray(noisy).save(root / "pairs" / split / "lq" / f"{name}.png")
    return root


def _tiny(config, folders, tmp_path):
    config.unlock()
    config.model.variant = "nafnet-tiny"
    config.data.gt_size = 32
    config.data.batch_size = 8
    config.data.data_dir = str(tmp_path / "tfds")
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    return config


@pytest.fixture(scope="module")
def pretrained(folders, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pretrain")
    config = _tiny(pretrain_prod.get_config(), folders, tmp_path)
    config.data.source_dir = str(folders / "clean")
    config.prod.ops = ("noise", "jpeg")  # Fewer operators: a smaller program to compile.
    config.prod.max_degradations = 2
    config.lock()
    out = registry.train(config, str(tmp_path / "run"))
    return tmp_path / "run", out


def test_pretrain_exports_params_of_the_model(pretrained):
    workdir, out = pretrained
    assert out["export"] == str(workdir / "export" / "params")
    config = pretrain_prod.get_config("variant=nafnet-tiny")
    params, path = services.load_params(config, str(workdir))
    assert path == out["export"]
    want = jax.tree.map(lambda s: s.shape, models.param_shapes("nafnet-tiny"))
    assert jax.tree.map(np.shape, params) == want
    assert out["report"].trainable_percent == pytest.approx(100.0)

    # TensorBoard: training scalars and degraded | restored | target image rows.
    events = tiny_training.read_events(str(workdir))
    tags = {(v.tag, e.step): v for e in events if e.HasField("summary") for v in e.summary.value}
    assert ("train_loss", 3) in tags
    images = [v.image for (tag, step), v in tags.items() if tag.startswith("samples/")]
    assert images and {(i.height, i.width) for i in images} == {(4 * 32, 3 * 32)}


def test_lora_finetune_saves_only_adapters_and_evaluates(pretrained, folders, tmp_path):
    pre_workdir, _ = pretrained
    config = _tiny(finetune_lora.get_config(), folders, tmp_path)
    config.init.checkpoint = str(pre_workdir)
    config.data.source_dir = str(folders / "pairs")
    config.eval.datasets.val.source_dir = str(folders / "pairs")
    config.lock()
    workdir = tmp_path / "lora"
    out = registry.train(config, str(workdir))

    report = out["report"]
    assert 0 < report.trainable < report.base
    assert report.by_label["lora"] > 0

    # The checkpoint holds the trainable tree only, plus the backbone's path and hash.
    step_dir = workdir / "checkpoints" / "3"
    metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
    export = str(pre_workdir / "export" / "params")
    assert metadata["backbone"] == checkpointing.backbone_reference(export)
    params, _ = services.load_params(config, export)
    restored, adaptation, step = services.restore_trained(config, str(workdir))
    assert step == 3
    trainable, frozen = adaptation.method.init_fn(jax.random.key(0), params)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_trainable == report.trainable
    assert all("lora" in k or "kernel" not in k for k in _paths(trainable))

    # Another LoRA rank is an error that names the arrays and the config key, and moves nothing:
    # the right config still evaluates the checkpoint afterwards.
    before = _files(workdir)
    wrong = config.copy_and_resolve_references()
    wrong.lora.rank = 8
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"lora\.rank: 4 in the checkpoint, 8 now.*lora_a is float32\[.*\] in the checkpoint",
    ):
        training.evaluate(wrong, workdir=str(workdir), out_dir=str(tmp_path / "wrong"))
    assert _files(workdir) == before and not (tmp_path / "wrong").exists()

    # eval.py's path restores the same model the run evaluated at its end.
    again = training.evaluate(config, workdir=str(workdir), out_dir=str(tmp_path / "again"))
    printed = registry.evaluate(config, workdir=str(workdir), out_dir=str(tmp_path / "printed"))
    assert "val" in printed and f"{again['datasets']['val']['mean']['psnr']:.2f}" in printed
    trained = out["eval"]["datasets"]["val"]["mean"]
    np.testing.assert_allclose(again["datasets"]["val"]["mean"]["psnr"], trained["psnr"], rtol=1e-6)
    assert (workdir / "eval" / "results.md").exists()


def _files(directory):
    return {
        os.path.relpath(os.path.join(root, name), directory): os.path.getmtime(
            os.path.join(root, name)
        )
        for root, _, names in os.walk(directory)
        for name in names
    }


def _paths(tree):
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]  # fmt: skip


def test_lora_method_is_identity_at_init_and_splits_by_rules():
    config = finetune_lora.get_config()
    model = models.build("nafnet-tiny")
    x = np.random.default_rng(0).random((1, 16, 16, 3), np.float32)
    params = model.init(jax.random.key(1), x)["params"]
    adaptation = methods.build(config, model, image_shape=x.shape)
    trainable, frozen = adaptation.method.init_fn(jax.random.key(2), params)
    restored = adaptation.method.apply_fn(trainable, frozen, x)
    np.testing.assert_array_equal(restored, model.apply({"params": params}, x))
    labels = partition.label_tree(partition.combine(trainable, frozen), adaptation.rules)
    flat = dict(zip(_paths(labels), jax.tree.leaves(labels)))
    assert flat["params/intro/kernel"] == "frozen"
    assert flat["params/intro/bias"] == "train"
    assert flat["lora/intro/lora_a"] == "lora"
    merged = adaptation.merge_fn(partition.combine(trainable, frozen))
    np.testing.assert_allclose(model.apply({"params": merged}, x), restored, atol=1e-6)


def test_config_errors_name_the_problem(tmp_path):
    config = finetune_lora.get_config()
    with pytest.raises(AttributeError, match="learning_rate|Did you mean"):
        config.optimizer.learning_rate = 1.0
    config.unlock()
    config.stage = "pretrain"
    with pytest.raises(ValueError, match="method must be 'full'"):
        registry.train(config, str(tmp_path))
    config.stage = "finetune"
    with pytest.raises(ValueError, match="exactly one of config.init.checkpoint"):
        registry.train(config, str(tmp_path))
    config.init.checkpoint = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No exported params"):
        services.load_backbone(config)
    # Evaluating a workdir that does not exist names it and creates nothing.
    with pytest.raises(FileNotFoundError, match="No checkpoints: the directory .*nowhere"):
        training.evaluate(config, workdir=str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    config.method = "lorra"
    with pytest.raises(ValueError, match="'lorra' is not one of"):
        methods.build(config, models.build("nafnet-tiny"), image_shape=(1, 8, 8, 3))
    config.stage = "fine-tune"
    with pytest.raises(ValueError, match=r"config.stage='fine-tune' is not one of \('pretrain'"):
        registry.train(config, str(tmp_path))


def test_eval_dataset_spec_is_a_config_entry():
    entry = common.eval_dataset("paired", "/x", split="test", noise_sigma=25.0)
    assert entry.split == "test" and entry.noise_sigma == 25.0


def test_stages_dispatch_through_the_stage_registry(monkeypatch, tmp_path):
    """A registered stage runs; train.py / eval.py know no stage by name."""
    calls = []

    def own_training(config, workdir):
        calls.append(("train", config.stage, workdir))
        return {"eval": "trained"}

    def own_evaluation(config, *, workdir=None, checkpoint=None, datasets=None, out_dir=None):
        calls.append(("eval", workdir, checkpoint, datasets, out_dir))
        return {"score": 1.0}

    stage = registry.Stage(own_training, own_evaluation, summary=lambda r: f"score {r['score']}")
    monkeypatch.setitem(registry.REGISTRY, "composed", stage)
    monkeypatch.setitem(registry.REGISTRY, "untested", registry.Stage(own_training))
    config = finetune_lora.get_config()
    config.unlock()
    config.stage = "composed"
    assert registry.train(config, str(tmp_path)) == {"eval": "trained"}
    run = str(tmp_path)
    assert registry.evaluate(config, workdir=run, datasets=["val"], out_dir="o") == "score 1.0"
    assert calls == [("train", "composed", run), ("eval", run, None, ["val"], "o")]
    config.stage = "untested"
    with pytest.raises(ValueError, match="'untested' has nothing to evaluate"):
        registry.evaluate(config, workdir=run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        registry.evaluate(config, workdir=str(tmp_path / "typo"))


def test_pretraining_asks_the_method_registry(monkeypatch, tmp_path):
    """Pre-training asks the method registry whether the method, as configured, trains the
    whole backbone; the stage knows no method by name."""
    spec = methods.MethodSpec(
        parts=methods.REGISTRY["lora"].parts,
        sections={"lora": methods.lora.default_config},
        trains_backbone=lambda config: config.seed == 7,
    )
    monkeypatch.setitem(methods.REGISTRY, "composed", spec)
    config = finetune_lora.get_config()
    config.unlock()
    config.method, config.stage = "composed", "pretrain"
    assert not methods.trains_backbone(config)
    with pytest.raises(ValueError, match="method must be 'full' or 'lora_ir' or 'composed'"):
        registry.train(config, str(tmp_path))
    config.seed = 7
    assert methods.trains_backbone(config)
    training.check_config(config)  # passes: the stage would now train it
    assert methods.section_owner("lora") == "lora" and methods.section_owner("router") == "lora_ir"
