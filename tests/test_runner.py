"""End to end through the runner, as train.py / eval.py run it: pretrain, export, LoRA, eval."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common, finetune_lora, pretrain_prod
from ir_lora import checkpointing, methods, models, runner
from ir_lora.peft import partition

_spec = importlib.util.spec_from_file_location(
    "tiny_training", os.path.join(os.path.dirname(__file__), "tiny_training.py")
)
tiny_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_training)


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
    config.prod.ops = ["noise", "jpeg"]  # Fewer operators: a smaller program to compile.
    config.prod.max_degradations = 2
    config.lock()
    out = runner.train_and_evaluate(config, str(tmp_path / "run"))
    return tmp_path / "run", out


def test_pretrain_exports_params_of_the_model(pretrained):
    workdir, out = pretrained
    assert out["export"] == str(workdir / "export" / "params")
    config = pretrain_prod.get_config("nafnet-tiny")
    params, path = runner.load_params(config, str(workdir))
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
    out = runner.train_and_evaluate(config, str(workdir))

    report = out["report"]
    assert 0 < report.trainable < report.base
    assert report.by_label["lora"] > 0

    # The checkpoint holds the trainable tree only, plus the backbone's path and hash.
    step_dir = workdir / "checkpoints" / "3"
    metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
    export = str(pre_workdir / "export" / "params")
    assert metadata["backbone"] == checkpointing.backbone_reference(export)
    params, _ = runner.load_params(config, export)
    restored, adaptation, step = runner.restore_trained(config, str(workdir))
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
        runner.evaluate(wrong, workdir=str(workdir), out_dir=str(tmp_path / "wrong"))
    assert _files(workdir) == before and not (tmp_path / "wrong").exists()

    # eval.py's path restores the same model the run evaluated at its end.
    again = runner.evaluate(config, workdir=str(workdir), out_dir=str(tmp_path / "again"))
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
        runner.train_and_evaluate(config, str(tmp_path))
    config.stage = "finetune"
    with pytest.raises(ValueError, match="exactly one of config.init.checkpoint"):
        runner.load_backbone(config)
    config.init.checkpoint = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No exported params"):
        runner.load_backbone(config)
    # Evaluating a workdir that does not exist names it and creates nothing.
    with pytest.raises(FileNotFoundError, match="No checkpoints: the directory .*nowhere"):
        runner.evaluate(config, workdir=str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    config.method = "lorra"
    with pytest.raises(ValueError, match="'lorra' is not one of"):
        methods.build(config, models.build("nafnet-tiny"), image_shape=(1, 8, 8, 3))


def test_eval_dataset_spec_is_a_config_entry():
    entry = common.eval_dataset("paired", "/x", split="test", noise_sigma=25.0)
    assert entry.split == "test" and entry.noise_sigma == 25.0


def test_runner_dispatches_through_the_method_registry(monkeypatch, tmp_path):
    """A method registered with its own stage runs it; the runner knows no method by name."""
    calls = []

    def own_stage(config, workdir):
        calls.append(("train", config.method, workdir))
        return {"eval": "trained"}

    def own_evaluation(config, workdir, *, datasets=None, out_dir=None):
        calls.append(("eval", workdir, datasets, out_dir))
        return "evaluated"

    spec = methods.MethodSpec(
        parts=None,
        trains_backbone=lambda config: config.seed == 7,
        train_and_evaluate=own_stage,
        evaluate=own_evaluation,
    )
    monkeypatch.setitem(methods.REGISTRY, "composed", spec)
    config = finetune_lora.get_config()
    config.unlock()
    config.method = "composed"
    assert runner.train_and_evaluate(config, str(tmp_path)) == {"eval": "trained"}
    assert runner.evaluate(config, workdir="w", datasets=["val"], out_dir="o") == "evaluated"
    assert calls == [("train", "composed", str(tmp_path)), ("eval", "w", ["val"], "o")]
    with pytest.raises(ValueError, match="'composed' is evaluated from its workdir"):
        runner.evaluate(config, checkpoint="params")
    with pytest.raises(ValueError, match="'composed' builds no adapters"):
        methods.build(config, models.build("nafnet-tiny"), image_shape=(1, 8, 8, 3))

    # Pre-training asks the registry whether the method, as configured, trains the backbone.
    config.stage = "pretrain"
    assert not methods.trains_backbone(config)
    with pytest.raises(ValueError, match="method must be 'full' or 'moe' or 'composed'"):
        runner.train_and_evaluate(config, str(tmp_path))
    config.seed = 7
    assert methods.trains_backbone(config)
    assert runner.train_and_evaluate(config, str(tmp_path)) == {"eval": "trained"}
