"""Finished `train.py` runs as restore functions: the one place that knows how runs are stored.

`load_run(workdir)` is the seam between the restore command and the training layout. It reads
the run's config from its newest checkpoint (`metadata["extra"]["config"]`), restores that
checkpoint through the services (`services.restore_trained`, which checks the backbone and any other
frozen input against the hashes the checkpoint recorded) and turns it into a restore function
(`services.inference`): a mergeable method (full, LoRA, CoLoRA) becomes the plain backbone with
its adapters folded in, which runs exactly as fast as the backbone; AdaptIR and LoRA-IR keep
their forward pass, and LoRA-IR routes every image (each tile, when tiled) by its own router.
A UIR-LoRA composition workdir (stage `uir_lora`) holds its encoder's checkpoints and the saved
composition (`uir_lora.json`, `uir_lora/`): the composition is loaded
(`ir_lora.methods.uir_lora.stage`) with the config its encoder run recorded, and routes every
image likewise.

`load_adapters` loads several runs meant for one backbone. Before anything is restored it
compares the backbone hashes their checkpoints recorded and refuses runs trained on different
backbones, naming both.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from ir_lora import checkpointing
from ir_lora.restore import networks

_log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run ready to restore images.

    Attributes:
      workdir: the run's absolute workdir.
      config: its config (as recorded, or as given).
      step: the training step of the restored checkpoint (0 for a UIR-LoRA composition).
      backbone: `{"path", "sha256"}` of the backbone it was trained on (None: from scratch).
      forward: `(params, images) -> images`.
      params: the weights `forward` takes.
      merged: whether the adapters are folded into plain backbone params.
      model_multiple: the backbone pads its input with zeros to a multiple of this itself.
    """

    workdir: str
    config: ml_collections.ConfigDict
    step: int
    backbone: dict[str, str] | None
    forward: Callable[[Any, Any], Any]
    params: Any
    merged: bool
    model_multiple: int


def recorded_metadata(workdir: str) -> dict | None:
    """The newest readable checkpoint's metadata of `workdir`, or None."""
    return checkpointing.latest_metadata(os.path.join(os.path.abspath(workdir), CHECKPOINTS))


def _info_file(workdir: str) -> str:
    from ir_lora.methods.uir_lora import stage as uir_stage

    return os.path.join(workdir, uir_stage.INFO_FILE)


def resolve_workdir(workdir: str) -> str:
    """The run directory to restore: `workdir`, or the fine-tuning run of a quickstart workdir.

    Raises:
      FileNotFoundError: naming what is missing.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"Workdir {workdir!r} does not exist")
    if os.path.isfile(_info_file(workdir)) or os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        return workdir
    finetune = os.path.join(workdir, "finetune")  # `configs/quickstart.py` runs
    if os.path.isdir(os.path.join(finetune, CHECKPOINTS)):
        _log.info("%s is a quickstart workdir: restoring its fine-tuned run %s", workdir, finetune)
        return finetune
    raise FileNotFoundError(
        f"{workdir!r} holds no checkpoints ({CHECKPOINTS}/): give the workdir of a finished "
        "train.py run"
    )


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in its newest checkpoint."""
    metadata = recorded_metadata(workdir)
    config = ((metadata or {}).get("extra") or {}).get("config")
    if config is None:
        raise FileNotFoundError(
            f"No readable checkpoint with a recorded config in {workdir!r}/{CHECKPOINTS}"
        )
    return ml_collections.ConfigDict(config)


def _with_backbone(config, path: str):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        is_torch = path.endswith((".pth", ".pt"))
        config.init.checkpoint = "" if is_torch else os.path.abspath(path)
        config.init.torch = os.path.abspath(path) if is_torch else ""
    return config


def load_run(workdir: str, *, backbone_path: str | None = None, config=None) -> TrainedRun:
    """A finished run's newest checkpoint as a restore function (module docstring).

    Args:
      workdir: the run (or a quickstart workdir, whose fine-tuning run is taken).
      backbone_path: where the run's backbone lives now, if it moved; its hash must match.
      config: the run's config, instead of the recorded one (required for UIR-LoRA).

    Raises:
      FileNotFoundError: no checkpoint (or composition) in `workdir`.
      checkpointing.BackboneMismatchError: the backbone is not the one the run trained on.
    """
    from ir_lora import services  # the training stack, only for this source

    workdir = resolve_workdir(workdir)
    if os.path.isfile(_info_file(workdir)):
        return _load_composition(workdir, config, backbone_path)
    config = run_config(workdir) if config is None else config
    metadata = recorded_metadata(workdir) or {}
    if backbone_path:
        if metadata.get("backbone"):  # refuse a wrong backbone before building anything
            checkpointing.verify_backbone(metadata["backbone"], backbone_path)
        config = _with_backbone(config, backbone_path)
    variables, adaptation, step = services.restore_trained(config, workdir)
    overrides = dict(config.model.get("overrides", {}))
    model = services.build_model(config)
    forward, params = services.inference(adaptation, model, variables)
    merged = adaptation.merge_fn is not None
    if merged:  # one jitted program for every run of this architecture
        forward = networks.architecture_forward(config.model.variant, **overrides)
    _log.info(
        "%s: step %d of method %r on %s (adapters %s)",
        workdir,
        step,
        config.method,
        config.model.variant,
        "merged" if merged else "in the forward pass",
    )
    return TrainedRun(
        workdir=workdir,
        config=config,
        step=step,
        backbone=metadata.get("backbone"),
        forward=forward,
        params=params,
        merged=merged,
        model_multiple=networks.network_multiple(config.model.variant, **overrides),
    )


def _load_composition(workdir: str, config, backbone_path: str | None) -> TrainedRun:
    from ir_lora.methods.uir_lora import stage as uir_stage

    if config is None:
        try:
            config = run_config(workdir)  # what its encoder's training recorded
        except FileNotFoundError:
            raise ValueError(
                f"{workdir!r} is a UIR-LoRA composition whose encoder checkpoints record no "
                "config: pass the config it was trained with "
                "(--config configs/uir_lora.py:run=composition)"
            ) from None
    if backbone_path:
        config = _with_backbone(config, backbone_path)
    backbone, bundle, names, lora_config = uir_stage.load_bundle(config, workdir)
    forward = uir_stage.restore_fns(config, names, lora_config)["composition"]
    with open(_info_file(workdir)) as f:
        reference = json.load(f)["backbone"]
    _log.info("%s: UIR-LoRA composition of %s", workdir, ", ".join(names))
    overrides = dict(config.model.get("overrides", {}))
    return TrainedRun(
        workdir=workdir,
        config=config,
        step=0,
        backbone=reference,
        forward=forward,
        params={**bundle, "params": backbone},
        merged=False,
        model_multiple=networks.network_multiple(config.model.variant, **overrides),
    )


def recorded_backbone(workdir: str) -> dict[str, str] | None:
    """`{"path", "sha256"}` of the backbone a run recorded, without restoring anything."""
    workdir = resolve_workdir(workdir)
    if os.path.isfile(_info_file(workdir)):
        with open(_info_file(workdir)) as f:
            return json.load(f)["backbone"]
    metadata = recorded_metadata(workdir)
    if metadata is None:
        raise FileNotFoundError(f"No readable checkpoint in {workdir!r}/{CHECKPOINTS}")
    return metadata.get("backbone")


def check_same_backbone(workdirs: Mapping[str, str]) -> dict[str, str]:
    """The backbone reference shared by every named run.

    Raises:
      checkpointing.BackboneMismatchError: two runs recorded different backbones (both named),
        or a run was trained from scratch (it has no backbone to share).
    """
    first = None
    for name, workdir in workdirs.items():
        reference = recorded_backbone(workdir)
        if reference is None:
            raise checkpointing.BackboneMismatchError(
                f"Adapter {name!r} ({workdir}) records no backbone (trained from scratch): "
                "only runs fine-tuned from one backbone can share it"
            )
        if first is None:
            first = (name, workdir, reference)
        elif reference["sha256"] != first[2]["sha256"]:
            other, other_dir, other_ref = first
            raise checkpointing.BackboneMismatchError(
                f"Adapter {name!r} ({workdir}) was trained on backbone {reference['path']!r} "
                f"(sha256 {reference['sha256']}), but adapter {other!r} ({other_dir}) on "
                f"{other_ref['path']!r} (sha256 {other_ref['sha256']}): adapters applied "
                "together must share one backbone"
            )
    if first is None:
        raise ValueError("No adapters given")
    return first[2]


def load_adapters(
    workdirs: Mapping[str, str], *, backbone_path: str | None = None, config=None
) -> dict[str, TrainedRun]:
    """Runs fine-tuned from one backbone, by name; refused before loading if they disagree."""
    reference = check_same_backbone(workdirs)
    _log.info("%d adapters on backbone %s", len(workdirs), reference["path"])
    return {
        name: load_run(workdir, backbone_path=backbone_path, config=config)
        for name, workdir in workdirs.items()
    }


def load_export(path: str, variant: str | None, overrides) -> tuple[str, dict, Any, str]:
    """`(variant, overrides, params, directory)` of exported plain params.

    Without `variant`, the model is the one recorded by the run whose export this is.
    """
    directory = os.path.abspath(path)
    if os.path.isdir(os.path.join(directory, "export")):
        directory = os.path.join(directory, "export", "params")
    if os.path.basename(directory) == "variables":
        raise ValueError(
            f"{directory!r} holds a method whose adapters cannot be merged (AdaptIR, LoRA-IR): "
            "restore it from its workdir (--workdir)"
        )
    if variant is None:
        run_dir = os.path.dirname(os.path.dirname(directory))
        try:
            model = run_config(run_dir).model
        except FileNotFoundError:
            raise ValueError(
                f"{path!r}: give the model variant (--variant); no run records it next to the "
                "export"
            ) from None
        variant, overrides = model.variant, dict(model.get("overrides", {}))
    config = ml_collections.ConfigDict(
        {"model": {"variant": variant, "overrides": dict(overrides or {})}, "init": {}}
    )
    from ir_lora import services

    params, where = services.load_params(config, directory)
    return variant, dict(overrides or {}), params, where
