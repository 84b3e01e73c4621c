"""Backbones from a config: build `config.model`, load pre-trained params, export params.

Pre-trained params come from an exported params directory (`<workdir>/export/params`, written by
`export_params` at the end of every run), from the workdir that holds one, or from an official
PyTorch `.pth` file (`ir_lora.models.torch_io`). The path returned with them is what checkpoints
reference and hash (`ir_lora.checkpointing`).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ir_lora import models

EXPORT_DIR = os.path.join("export", "params")
# Methods whose adapters cannot be merged (AdaptIR, mixtures of experts) export every collection.
EXPORT_VARIABLES_DIR = os.path.join("export", "variables")


def build_model(config):
    """The backbone module of `config.model` (`variant` and its constructor `overrides`)."""
    return models.build(config.model.variant, **dict(config.model.get("overrides", {})))


def export_params(params: Any, directory: str) -> str:
    """Writes plain params with orbax (overwriting) and returns the absolute directory."""
    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()
    return directory


def _exported_dir(path: str) -> str:
    """An exported params directory, given it or a workdir that holds one."""
    candidate = os.path.join(path, EXPORT_DIR)
    return os.path.abspath(candidate if os.path.isdir(candidate) else path)


def load_params(config, path: str) -> tuple[Any, str]:
    """Backbone params of `config.model` from an exported directory, a workdir or a `.pth` file.

    Returns:
      `(params, resolved path)`; the path is what checkpoints reference and hash.
    """
    variant, overrides = config.model.variant, dict(config.model.get("overrides", {}))
    if path.endswith((".pth", ".pt")):
        key = config.init.get("torch_key") or None
        return models.from_torch(variant, path, key=key, **overrides), os.path.abspath(path)
    directory = _exported_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No exported params at {directory!r}: give a directory written by a previous run "
            f"(<workdir>/{EXPORT_DIR}), its workdir, or a PyTorch .pth file"
        )
    target = models.param_shapes(variant, **overrides)
    try:
        params = ocp.StandardCheckpointer().restore(directory, target)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Params in {directory!r} do not fit model {variant!r} {overrides or ''}: {error}"
        ) from error
    # Host arrays: orbax restores onto the devices the export was written from, which need not
    # be this run's mesh; the jitted init places them by the mesh's shardings instead.
    return jax.device_get(params), directory


def backbone_source(config) -> str:
    """The one pre-trained backbone `config.init` names: its checkpoint or its `.pth` path."""
    checkpoint, torch_path = config.init.get("checkpoint", ""), config.init.get("torch", "")
    if bool(checkpoint) == bool(torch_path):
        raise ValueError(
            f"stage={config.get('stage')!r} needs exactly one of config.init.checkpoint "
            "(exported params or a workdir) and config.init.torch (a .pth file); got "
            f"checkpoint={checkpoint!r}, torch={torch_path!r}"
        )
    return checkpoint or torch_path


def load_backbone(config) -> tuple[Any, str]:
    """The pre-trained backbone named by `config.init` (exactly one of checkpoint / torch)."""
    return load_params(config, backbone_source(config))
