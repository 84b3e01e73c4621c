"""A config's method on its backbone: build it, load its frozen inputs, restore a trained run.

`build_adaptation` is `methods.build` plus PROD inside the step when the data say so;
`frozen_inputs` loads the backbone (or what the method's own loader needs) and resolves the
method's references (e.g. LoRA-IR's router), whose paths and hashes the checkpoints record;
`restore_trained` gives back the newest checkpoint of a training workdir, checked against them;
`inference` turns its variables into a restore function and params (adapters merged where the
method allows).
"""

import os
from typing import Any

import jax
import ml_collections

from ir_lora import checkpointing, methods, train_lib
from ir_lora import sharding as sharding_lib
from ir_lora.peft import partition
from ir_lora.services.backbones import build_model, load_params


def build_adaptation(config, model) -> methods.Adaptation:
    """The config's method on `model`; with `data.degrade = "prod"` PROD synthesises the inputs
    inside the step (pre-training, or a fine-tune on clean crops)."""
    degrade = config.data.get("degrade", "")
    if degrade not in ("", "prod"):
        raise ValueError(f"config.data.degrade={degrade!r} is not one of '' or 'prod'")
    degrade_fn = None
    if degrade == "prod":
        from ir_lora import degradations  # noqa: PLC0415 (the sampler only when it is used)

        prod_config = config.prod

        def degrade_fn(rng, clean):
            return degradations.prod(rng, clean, prod_config)

    shape = (1, config.data.gt_size, config.data.gt_size, 3)
    return methods.build(config, model, image_shape=shape, degrade_fn=degrade_fn)


def _get(config, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def reference_paths(config) -> dict[str, str]:
    """`{name: path}` of the method's references (`MethodSpec.references`), as configured."""
    return {
        name: reference.resolve(_get(config, reference.field))
        for name, reference in methods.spec(config).references.items()
    }


def with_recorded_references(config, workdir: str):
    """`config` with every empty reference field set to what the workdir's checkpoints recorded.

    A resumed training run and a restored one are held to the references they were trained
    with: a given or recorded reference whose content differs from the recorded hash is refused.

    Raises:
      ReferenceMismatchError: the configured reference, or the recorded one when the config
        leaves it empty, is not (any more) what the checkpoints were trained with; the message
        names both paths and the config field.
      FileNotFoundError: the field is empty and the recorded path no longer exists.
    """
    references = methods.spec(config).references
    if not references:
        return config
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    recorded_all = (checkpointing.latest_metadata(directory) or {}).get("references") or {}
    updates = {}
    for name, reference in references.items():
        recorded = recorded_all.get(name)
        if recorded is None:
            continue
        given = _get(config, reference.field)
        path = reference.resolve(given) if given else recorded["path"]
        if not os.path.exists(path):
            if given:  # the method's loader names the missing path
                continue
            raise FileNotFoundError(
                f"The {name} {recorded['path']!r} recorded by the checkpoints in {workdir!r} no "
                f"longer exists: give its new place in config.{reference.field}"
            )
        try:
            checkpointing.verify_reference(recorded, path, name=name)
        except checkpointing.ReferenceMismatchError as error:
            setting = f"config.{reference.field}={given!r}"
            if os.path.realpath(path) != os.path.realpath(recorded["path"]):
                why = f"{setting} is another {name} than {recorded['path']!r}"
            else:
                why = f"the {name} {path!r} ({setting}) has changed"
            raise checkpointing.ReferenceMismatchError(
                f"{why}, which the checkpoints in {workdir!r} were trained with: {error}"
            ) from None
        if not given:
            updates[reference.field] = recorded["path"]
    if not updates:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in updates.items():
            *parents, leaf = dotted.split(".")
            _get(config, ".".join(parents))[leaf] = value
    return config


def frozen_inputs(config) -> tuple[tuple, str | None, dict[str, str]]:
    """`(init_args, backbone path, references)`: what `init_fn` gets after the key, and the
    frozen inputs whose path and hash checkpoints record.

    A method with its own loader (`MethodSpec.load`, e.g. LoRA-IR: backbone, modulation and
    router) uses it; otherwise the backbone `config.init` names is loaded, or none (training
    from scratch).
    """
    spec = methods.spec(config)
    references = reference_paths(config)
    if spec.load is not None:
        tree, path = spec.load(config, load_params)
        return (tree,), path, references
    checkpoint, torch_path = config.init.get("checkpoint", ""), config.init.get("torch", "")
    if checkpoint and torch_path:
        raise ValueError(
            f"config.init: give at most one of checkpoint and torch, got checkpoint="
            f"{checkpoint!r}, torch={torch_path!r}"
        )
    if checkpoint or torch_path:
        backbone, path = load_params(config, checkpoint or torch_path)
        return (backbone,), path, references
    return (), None, references


def inference(adaptation: methods.Adaptation, model, variables) -> tuple[Any, Any]:
    """`(restore_fn(params, images), params)` for evaluation and export.

    Mergeable methods give the plain backbone params (adapters folded in); the others (AdaptIR,
    mixtures of experts) keep every variable collection and run the method's forward pass.
    """
    if adaptation.merge_fn is not None:
        return (lambda p, x: model.apply({"params": p}, x)), adaptation.merge_fn(variables)
    return (lambda v, x: adaptation.method.apply_fn(v, {}, x)), variables


def restore_trained(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[dict, methods.Adaptation, int]:
    """The newest checkpoint of a training workdir as variables (every collection, unmerged).

    The backbone comes from `config.init` (the method's references from the config, or where
    the checkpoint recorded them) and is checked against the hash the checkpoint recorded.
    Returns `(variables, adaptation, step)`; `inference` turns them into a restore function and
    its params (adapters merged where the method allows).
    """
    # First: a missing workdir is an error that names it, before anything is built or written.
    manager = checkpointing.make_manager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), create=False
    )
    config = with_recorded_references(config, workdir)
    model = build_model(config)
    adaptation = build_adaptation(config, model)
    init_args, backbone_path, references = frozen_inputs(config)
    tx = train_lib.make_optimizer(config.optimizer, num_train_steps=int(config.num_train_steps))
    state, frozen, _, _ = train_lib.create_train_state(
        init_fn=adaptation.method.init_fn,
        tx=tx,
        rng=int(config.seed),
        mesh=sharding_lib.make_mesh(config),
        init_args=init_args,
    )
    restored = checkpointing.restore(
        manager, state, backbone_path=backbone_path, reference_paths=references, config=config
    )
    if restored is None:
        raise FileNotFoundError(f"No readable checkpoint in {workdir}/checkpoints")
    state = restored[0]
    variables = jax.device_get(partition.combine(state.trainable, frozen))
    return variables, adaptation, int(state.step)
