"""The restore command on finished train.py runs (tiny): --workdir, --adapter, UIR-LoRA."""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from ir_lora import checkpointing, inference, models, services
from ir_lora.methods import uir_lora
from ir_lora.methods.uir_lora import stage as uir_stage
from ir_lora.restore import Restorer, cli, runs
from ir_lora.stages import registry

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _save(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _pairs(root, rng, degrade):
    for name in ("a", "b"):
        gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        _save(os.path.join(root, "train", "gt", f"{name}.png"), gt)
        _save(os.path.join(root, "train", "lq", f"{name}.png"), degrade(gt))


def _lora_run(tmp, name, backbone, data):
    config = common.training_config("finetune", "lora")
    config.model.variant = "nafnet-tiny"
    config.init.checkpoint = backbone
    config.lora.tune_bias_norm = False  # composable by UIR-LoRA too
    config.data.source_dir = data
    config.data.data_dir = str(tmp / "tfds" / name)
    config.data.gt_size = 32
    config.data.batch_size = 8
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.optimizer.lr = 0.05  # visibly different adapters after two steps
    registry.train(config, str(tmp / name))
    return str(tmp / name)


def _checkpoint_only_run(workdir, backbone):
    """A run directory whose checkpoint records `backbone`, as the trainer's saves do; the
    refusal by hash reads nothing else, so it needs no training."""
    manager = checkpointing.make_manager(workdir / "checkpoints")
    reference = checkpointing.backbone_reference(backbone)
    checkpointing.save(manager, {"w": np.zeros(2, np.float32)}, step=1, backbone=reference)
    manager.wait_until_finished()
    manager.close()
    return str(workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRA runs on backbone A, a run recorded on backbone B, and a UIR-LoRA composition."""
    tmp = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    _pairs(str(tmp / "dark"), rng, lambda gt: (gt // 3).astype(np.uint8))
    _pairs(str(tmp / "noisy"), rng, lambda gt: np.clip(gt + 40, 0, 255).astype(np.uint8))
    shapes = models.param_shapes("nafnet-tiny")
    backbones = {}
    for key, seed in (("A", 1), ("B", 2)):
        draw = np.random.default_rng(seed).standard_normal
        params = jax.tree.map(lambda s, d=draw: 0.1 * d(s.shape, np.float32), shapes)
        backbones[key] = services.export_params(params, str(tmp / f"backbone_{key}"))
    lora = {
        "dark": _lora_run(tmp, "lora_dark", backbones["A"], str(tmp / "dark")),
        "noisy": _lora_run(tmp, "lora_noisy", backbones["A"], str(tmp / "noisy")),
        "other": _checkpoint_only_run(tmp / "lora_other", backbones["B"]),
    }
    config = common.with_backbone(common.trainer_config("uir_lora"))
    config.model.variant = "nafnet-tiny"
    config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 2, 1, 2
    config.init.checkpoint = backbones["A"]
    config.uir_lora = uir_lora.default_config()
    config.uir_lora.encoder.crop = 32
    config.uir_lora.encoder.batch_size = 8
    config.uir_lora.runs.dark = lora["dark"]
    config.uir_lora.runs.noisy = lora["noisy"]
    registry.train(config, str(tmp / "uirlora"))
    photos = tmp / "photos"
    for name, size in (("one", (37, 50)), ("sub/two", (33, 29))):
        _save(str(photos / f"{name}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return {"tmp": tmp, "backbones": backbones, "lora": lora, "uir": config, "photos": photos}


@pytest.fixture(scope="module")
def reference(trained):
    """`reference(name, image)`: run `name`'s own unmerged forward pass, padded as eval.py."""
    forwards = {}
    for name in ("dark", "noisy"):
        workdir = trained["lora"][name]
        config = runs.run_config(workdir)
        variables, adaptation, _ = services.restore_trained(config, workdir)
        apply = jax.jit(adaptation.method.apply_fn)
        forwards[name] = (lambda x, a=apply, v=variables: a(v, {}, x), config.eval.pad_multiple)

    def restore(name, image):
        forward, multiple = forwards[name]
        return inference.restore_image(forward, image, pad_multiple=multiple)

    return restore


@pytest.fixture(scope="module")
def loaded(trained):
    return runs.load_adapters({n: trained["lora"][n] for n in ("dark", "noisy")})


def _expected_png(reference, name, path):
    lq = _png(path).astype(np.float32) / 255.0
    return np.rint(np.clip(reference(name, lq), 0, 1) * 255)


def _close_to(got, want):
    assert got.shape == want.shape
    assert np.mean(np.abs(got - want) <= 1) > 0.999


def _png(path):
    return np.asarray(Image.open(path))


def test_workdir_restores_as_the_trained_forward_pass_with_merged_adapters(
    trained, reference, loaded
):
    run = loaded["dark"]
    image = np.random.default_rng(3).random((37, 50, 3), dtype=np.float32)
    np.testing.assert_allclose(Restorer.from_run(run)(image), reference("dark", image), atol=1e-5)
    assert run.merged and run.step == 2 and run.workdir == trained["lora"]["dark"]
    assert run.backbone["sha256"] == checkpointing.hash_path(trained["backbones"]["A"])


def test_command_with_a_workdir_writes_the_runs_outputs(trained, reference, tmp_path):
    workdir, photos = trained["lora"]["dark"], trained["photos"]
    out = tmp_path / "out"
    assert cli.main(["--input", str(photos), "--output", str(out), "--workdir", workdir]) == 0
    for name in ("one", "sub/two"):
        want = _expected_png(reference, "dark", photos / f"{name}.png")
        _close_to(_png(out / f"{name}.png"), want)


def test_quickstart_workdir_resolves_to_its_finetuning_run(trained, tmp_path):
    fake = tmp_path / "quickstart"
    shutil.copytree(trained["lora"]["dark"], fake / "finetune")
    assert runs.resolve_workdir(str(fake)) == str(fake / "finetune")
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        runs.resolve_workdir(str(tmp_path))


def test_quickstart_ends_by_restoring_its_held_out_photographs(trained, reference, tmp_path):
    from ir_lora.stages import quickstart

    workdir = tmp_path / "quickstart"
    shutil.copytree(trained["lora"]["dark"], workdir / "finetune")
    shutil.copytree(trained["photos"], workdir / "data" / "haze" / "val" / "lq")
    restored = quickstart.restore_held_out(str(workdir))
    assert restored == str(workdir / "restored")
    for name in ("one", "sub/two"):
        want = _expected_png(reference, "dark", trained["photos"] / f"{name}.png")
        _close_to(_png(workdir / "restored" / f"{name}.png"), want)
    # A second quickstart in the same workdir replaces its own outputs.
    assert quickstart.restore_held_out(str(workdir)) == restored


def test_moved_backbone_is_found_by_flag_and_checked_by_hash(trained, reference, tmp_path):
    moved = shutil.copytree(trained["backbones"]["A"], tmp_path / "moved")
    image = np.random.default_rng(4).random((20, 24, 3), dtype=np.float32)
    restorer = Restorer.from_workdir(trained["lora"]["dark"], backbone=str(moved))
    np.testing.assert_allclose(restorer(image), reference("dark", image), atol=1e-5)
    with pytest.raises(checkpointing.BackboneMismatchError):
        Restorer.from_workdir(trained["lora"]["dark"], backbone=trained["backbones"]["B"])


def test_two_adapters_on_one_backbone_write_one_folder_each(trained, reference, tmp_path):
    photos, lora = trained["photos"], trained["lora"]
    out = tmp_path / "out"
    argv = ["--input", str(photos), "--output", str(out)]
    argv += ["--adapter", f"dark={lora['dark']}", "--adapter", f"noisy={lora['noisy']}"]
    assert cli.main(argv) == 0
    for name in ("dark", "noisy"):
        for image in ("one.png", "sub/two.png"):
            _close_to(_png(out / name / image), _expected_png(reference, name, photos / image))
    assert not np.array_equal(_png(out / "dark" / "one.png"), _png(out / "noisy" / "one.png"))


def test_adapters_share_one_compiled_network(loaded):
    first, second = (Restorer.from_run(run) for run in loaded.values())
    assert first.forward is second.forward  # merged: plain backbones of one architecture
    image = np.zeros((21, 30, 3), np.float32)
    first(image)
    compiled = first.compiled_programs()
    second(image)
    assert second.compiled_programs() == compiled


def test_adapter_on_another_backbone_is_refused_naming_both(trained, tmp_path, capsys):
    lora, backbones = trained["lora"], trained["backbones"]
    argv = ["--input", str(trained["photos"]), "--output", str(tmp_path / "out")]
    argv += ["--adapter", f"dark={lora['dark']}", "--adapter", f"other={lora['other']}"]
    assert cli.main(argv) == cli.EXIT_ERROR
    message = capsys.readouterr().err
    for text in ("'dark'", "'other'", backbones["A"], backbones["B"]):
        assert text in message
    assert not (tmp_path / "out").exists()


def test_uirlora_composition_routes_every_image(trained, tmp_path):
    workdir = str(trained["tmp"] / "uirlora")
    config = trained["uir"]
    backbone, bundle, names, lora_config = uir_stage.load_bundle(config, workdir)
    composed = uir_stage.restore_fns(config, names, lora_config)["composition"]
    params = {**bundle, "params": backbone}
    image = np.random.default_rng(5).random((37, 50, 3), dtype=np.float32)
    want = inference.restore_image(
        jax.jit(lambda x: composed(params, x)), image, pad_multiple=config.eval.pad_multiple
    )
    # The config comes from what the composition's encoder run recorded.
    np.testing.assert_allclose(Restorer.from_workdir(workdir)(image), want, atol=1e-5)
    got = Restorer.from_workdir(workdir, config=config)(image)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_without_variant_takes_the_runs_model(trained, reference):
    workdir = trained["lora"]["dark"]
    image = np.random.default_rng(6).random((32, 32, 3), dtype=np.float32)
    from_export = Restorer.from_export(os.path.join(workdir, "export", "params"))
    # Exported params are the merged ones; 32x32 needs no padding, so the paddings agree.
    np.testing.assert_allclose(from_export(image), reference("dark", image), atol=1e-5)
