"""The LoRA-IR all-in-one experiment: a tiny run, then `evaluate` from its workdir alone."""

import json
import os

import pytest

from configs import lora_ir_allinone
from ir_lora.methods.lora_ir import allinone
from ir_lora.stages import registry

CLASSES = ("noise", "jpeg")


def _tiny_config():
    config = lora_ir_allinone.get_config()
    config.unlock()
    for section in (config.router_stage, config.backbone, config.experts):
        section.prod.ops = CLASSES
        section.router.widths, section.router.embed_dim = (8, 8), 8
        section.data.gt_size, section.data.batch_size = 16, 8  # 8 test devices
        section.num_train_steps, section.log_every_steps = 2, 1
        section.checkpoint_every_steps = 2
        section.optimizer.warmup_steps = 0
    for section in (config.backbone, config.experts):
        section.model.variant = "nafnet-tiny"
        # One NAFBlock and no levels: the graph, and so the compile time, stays small.
        section.model.overrides = {"width": 4, "enc_blk_nums": (), "dec_blk_nums": ()}
        section.lora_ir.classes = CLASSES
        section.eval.save_comparisons = False
    config.router_stage.classes = CLASSES
    config.router_stage.eval_batches = 1
    config.classes, config.prod = CLASSES, config.experts.prod
    config.photos_max_side, config.tile_size = 32, 16
    config.lock()
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast_compilation):
    """A finished tiny run: `(workdir, the table it printed)`."""
    del fast_compilation  # on for the run and the tests that use it
    workdir = str(tmp_path_factory.mktemp("allinone"))
    return workdir, registry.train(_tiny_config(), workdir)


def test_evaluate_reproduces_the_training_table(trained):
    workdir, table = trained
    assert "| noise |" in table and "| jpeg |" in table
    again = registry.evaluate(_tiny_config(), workdir=workdir)
    assert again == table
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "allinone.md")) as f:
        assert f.read() == table + "\n"
    with open(os.path.join(out, "allinone.json")) as f:
        scores = json.load(f)
    assert set(scores["stage3"]) == set(CLASSES)
    assert 0.0 <= scores["routing_accuracy"] <= 1.0
    # Stages 2 and 3 were restored, not retrained: no new checkpoint steps appeared.
    assert sorted(os.listdir(os.path.join(workdir, "experts", "checkpoints"))) == ["2"]


def test_evaluate_names_the_missing_stage(trained):
    workdir, _ = trained
    checkpoints = os.path.join(workdir, "experts", "checkpoints")
    os.rename(checkpoints, checkpoints + ".moved")
    try:
        with pytest.raises(FileNotFoundError, match=r"experts stage left no .*checkpoints"):
            allinone.evaluate(_tiny_config(), workdir=workdir)
    finally:
        os.rename(checkpoints + ".moved", checkpoints)
