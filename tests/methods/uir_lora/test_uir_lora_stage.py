"""The `uir_lora` stage end to end (as train.py / eval.py run it), tiny."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from ir_lora import checkpointing, models, services
from ir_lora.methods import uir_lora
from ir_lora.methods.uir_lora import stage as uir_stage
from ir_lora.stages import registry

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _save(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _pairs(root, split, names, degrade, rng):
    for name in names:
        gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        _save(os.path.join(root, split, "gt", f"{name}.png"), gt)
        _save(os.path.join(root, split, "lq", f"{name}.png"), degrade(gt))


def _tiny(config, tmp):
    config.model.variant = "nafnet-tiny"
    config.data.gt_size = 32
    config.data.batch_size = 8
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval.save_comparisons = False
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uir_lora")
    rng = np.random.default_rng(0)
    dark = lambda gt: (gt // 3).astype(np.uint8)
    noisy = lambda gt: np.clip(gt + rng.integers(-30, 31, gt.shape), 0, 255).astype(np.uint8)
    _pairs(str(tmp / "dark"), "train", ["a", "b"], dark, rng)
    _pairs(str(tmp / "noisy"), "train", ["a", "b"], noisy, rng)
    _pairs(str(tmp / "mixed"), "test", ["dark__x", "noisy__y"], lambda g: noisy(dark(g)), rng)
    shapes = models.param_shapes("nafnet-tiny")
    params = jax.tree.map(lambda s: np.full(s.shape, 0.05, s.dtype), shapes)
    backbone = services.export_params(params, str(tmp / "backbone"))
    runs = {}
    for name in ("dark", "noisy"):
        config = _tiny(common.training_config("finetune", "lora"), tmp)
        config.init.checkpoint = backbone
        config.lora.tune_bias_norm = False
        config.data.source_dir = str(tmp / name)
        registry.train(config, str(tmp / f"lora_{name}"))
        runs[name] = str(tmp / f"lora_{name}")
    config = common.with_backbone(common.trainer_config("uir_lora"))
    config.model.variant = "nafnet-tiny"
    config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 2, 1, 2
    config.eval.save_comparisons = False
    config.init.checkpoint = backbone
    config.uir_lora = uir_lora.default_config()
    config.uir_lora.encoder.crop = 32
    config.uir_lora.encoder.batch_size = 8
    for name, workdir in runs.items():
        config.uir_lora.runs[name] = workdir
    config.eval.datasets.mixed = common.eval_dataset("paired", str(tmp / "mixed"), split="test")
    out = registry.train(config, str(tmp / "composition"))
    return tmp, config, out


def test_stage_evaluates_composition_and_every_single_lora(setup):
    tmp, _, out = setup
    assert set(out["variants"]) == {"base", "lora:dark", "lora:noisy", "uniform", "composition"}
    assert out["eval"] is out["variants"]["composition"]
    assert out["eval"]["datasets"]["mixed"]["num_images"] == 2
    table = (tmp / "composition" / "eval" / "uir_lora.md").read_text()
    assert "| composition |" in table and "| group | dark | noisy |" in table


def test_eval_from_the_workdir_reproduces_the_stage(setup):
    tmp, config, out = setup
    again = uir_stage.evaluate(config, workdir=str(tmp / "composition"), out_dir=str(tmp / "a"))
    np.testing.assert_allclose(
        again["datasets"]["mixed"]["mean"]["psnr"],
        out["eval"]["datasets"]["mixed"]["mean"]["psnr"],
        rtol=1e-6,
    )


def test_another_backbone_is_refused(setup, tmp_path):
    _, config, _ = setup
    other = jax.tree.map(
        lambda s: np.full(s.shape, 0.01, s.dtype), models.param_shapes("nafnet-tiny")
    )
    config = config.copy_and_resolve_references()
    config.init.checkpoint = services.export_params(other, str(tmp_path / "other"))
    with pytest.raises(checkpointing.BackboneMismatchError):
        uir_stage.load_runs(config, config.init.checkpoint)


def test_runs_that_tuned_biases_are_refused(setup, tmp_path):
    tmp, config, _ = setup
    run = uir_stage.run_config(str(tmp / "lora_dark"))
    with run.unlocked():
        run.lora.tune_bias_norm = True
    with pytest.raises(ValueError, match="only low-rank factors can be composed"):
        uir_stage._check_run("dark", "somewhere", run, config)
