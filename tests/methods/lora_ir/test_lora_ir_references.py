"""method = lora_ir checkpoints reference their router: recorded, used when the config omits it,
and a different or changed router refused with both paths named."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import lora_ir_experts
from ir_lora import checkpointing, models, services
from ir_lora.methods.lora_ir import routing
from ir_lora.stages import registry

SIZE = 16


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _config(root, router: str):
    config = lora_ir_experts.get_config()
    config.unlock()
    config.model.variant, config.model.overrides = "nafnet-tiny", {}
    # Paired data: no PROD in the train step, a smaller program to compile.
    config.data.dataset, config.data.degrade, config.data.split = "paired", "", "train"
    config.data.source_dir = str(root / "pairs")
    config.data.data_dir = str(root / "tfds")
    config.data.gt_size, config.data.batch_size = SIZE, 8  # divisible by the 8 test devices
    config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 1, 1, 1
    config.optimizer.warmup_steps = 0
    config.lora_ir.classes = ("noise", "jpeg")
    config.prod.ops = ("noise", "jpeg")
    config.router.widths, config.router.embed_dim = (8, 8), 16
    config.router.checkpoint = router
    config.init.checkpoint = str(root / "backbone")
    config.eval.datasets = ml_collections.ConfigDict()
    config.export = False
    return config


def _export_router(config, directory, seed: int) -> str:
    """A router's params where `routing.load_router` reads them (`<dir>/export/router`)."""
    model = routing.build_router(config.router)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))["params"]
    services.export_params(params, os.path.join(directory, routing.EXPORT_DIR))
    return str(directory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step experts-stage run against router A; router B exists beside it."""
    root = tmp_path_factory.mktemp("lora_ir_refs")
    rng = np.random.default_rng(0)
    for kind in ("gt", "lq"):
        os.makedirs(root / "pairs" / "train" / kind)
        for name in ("a", "b"):
            pixels = rng.integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "pairs" / "train" / kind / f"{name}.png")
    model = models.build("nafnet-tiny")
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    services.export_params(params, root / "backbone")
    config = _config(root, "")
    router_a = _export_router(config, root / "router_a", seed=1)
    router_b = _export_router(config, root / "router_b", seed=2)
    config.router.checkpoint = router_a
    config.lock()
    registry.train(config, str(root / "run"))
    return root, router_a, router_b


def test_the_checkpoint_records_the_router_and_restores_from_it(trained):
    root, router_a, _ = trained
    metadata = checkpointing.latest_metadata(root / "run" / "checkpoints")
    recorded = metadata["references"]["router"]
    assert recorded == checkpointing.backbone_reference(os.path.join(router_a, routing.EXPORT_DIR))
    # The backbone is recorded as before; the router is not mistaken for it.
    assert metadata["backbone"]["path"] == str(root / "backbone")

    config = _config(root, "")  # the router left empty: the recorded one is used
    variables, _, step = services.restore_trained(config, str(root / "run"))
    expected, _ = routing.load_router(_config(root, router_a).router)
    assert step == 1
    for got, want in zip(jax.tree.leaves(variables["router"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    # Naming the recorded router (its workdir or its export directory) is the same.
    explicit, _, _ = services.restore_trained(_config(root, router_a), str(root / "run"))
    np.testing.assert_array_equal(
        jax.tree.leaves(explicit["experts"])[0], jax.tree.leaves(variables["experts"])[0]
    )


def test_another_router_or_a_changed_one_is_refused_naming_both_paths(trained, tmp_path):
    root, router_a, router_b = trained
    recorded = os.path.join(router_a, routing.EXPORT_DIR)
    with pytest.raises(checkpointing.ReferenceMismatchError) as error:
        services.restore_trained(_config(root, router_b), str(root / "run"))
    message = str(error.value)
    assert recorded in message and os.path.join(router_b, routing.EXPORT_DIR) in message
    assert "config.router.checkpoint" in message

    # The same content elsewhere is the same router (as for a moved backbone).
    copy = tmp_path / "router_copy"
    shutil.copytree(router_a, copy)
    services.restore_trained(_config(root, str(copy)), str(root / "run"))

    # The recorded router changed on disk since training: refused, empty config or not.
    shutil.rmtree(recorded)
    shutil.copytree(os.path.join(router_b, routing.EXPORT_DIR), recorded)
    try:
        for given in ("", router_a):
            with pytest.raises(checkpointing.ReferenceMismatchError, match="has changed") as error:
                services.restore_trained(_config(root, given), str(root / "run"))
            assert recorded in str(error.value)
        shutil.rmtree(recorded)  # and gone: named, with where to give the router instead
        with pytest.raises(FileNotFoundError, match="config.router.checkpoint") as error:
            services.restore_trained(_config(root, ""), str(root / "run"))
        assert recorded in str(error.value)
    finally:  # the module's run stays restorable for any other test
        shutil.rmtree(recorded, ignore_errors=True)
        shutil.copytree(os.path.join(copy, routing.EXPORT_DIR), recorded)
