"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Each step directory `<workdir>/checkpoints/<step>/` holds three orbax items:

  state     the `TrainState` (step, trainable, opt_state, rng): never the frozen tree
  data_iter the data iterator's `get_state()` as JSON (grain dict or bytes), so input resumes
            exactly where it stopped
  metadata  JSON: {"step", "backbone": {"path", "sha256"} | None,
            "references": {name: {"path", "sha256"}}, "extra": {...} (the trainer's config),
            "arrays": {path: {"dtype", "shape"}}, "checksums": {"algorithm",
            "state": {path: sha256}, "data_iter": sha256}, "metadata_sha256"}

A fine-tuning checkpoint therefore holds only trainable parameters (adapters) plus a reference to
the frozen backbone, and to any other frozen input the method reads (`references`, e.g. LoRA-IR's
router); `restore` re-hashes each of them and refuses a mismatch. Orbax writes each step into a
temporary directory and renames it when complete, so a process killed mid-save leaves no step
directory behind.

`restore` tells a mismatched config from a corrupt checkpoint (`ir_lora.checkpoint_integrity`):

* a state whose paths, shapes or dtypes differ from what is on disk (another optimizer, another
  LoRA rank), or an intact iterator record the current pipeline rejects, raises
  `CheckpointMismatchError` naming the paths and the config keys that differ from the recorded
  config; nothing on disk is touched;
* a step that cannot be read, or whose arrays or JSON items do not hash to the SHA-256 recorded
  when it was written (`metadata["checksums"]`), is corrupt: a warning names it and the previous
  step is tried. Only a caller that will write new steps (the trainer, `quarantine=True`) moves
  it to `<directory>_corrupt/<step>.<time>` (kept, never deleted), so that its step number can be
  saved again; readers (evaluation) leave it where it is.
"""

import base64
import json
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ir_lora import checkpoint_integrity as integrity
from ir_lora.checkpoint_integrity import CheckpointMismatchError
from ir_lora.frozen_references import (  # noqa: F401  (the checkpoint API callers use)
    BackboneMismatchError,
    ReferenceMismatchError,
    backbone_reference,
    hash_path,
    verify_backbone,
    verify_reference,
)


def make_manager(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3, create: bool = True
) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `directory`; saves are asynchronous.

    Args:
      directory: the checkpoints directory, created if missing when `create`.
      max_to_keep: how many steps to keep (None: all).
      create: False for readers: a missing directory is then an error that names it.

    Raises:
      FileNotFoundError: `directory` is missing and `create` is False.
    """
    if not create and not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints: the directory {os.fspath(directory)!r} is missing"
        )
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    # Handlers named up front, so that `item_metadata` can read the state's tree before a restore.
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data_iter": ocp.JsonCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        epath.Path(directory).absolute(), options=options, item_handlers=handlers
    )


def _encode_iterator_state(data_iterator: Any) -> dict[str, Any]:
    if data_iterator is None or not hasattr(data_iterator, "get_state"):
        return {"kind": "none"}
    state = data_iterator.get_state()
    # grain's DataLoader iterator returns JSON bytes, its dataset iterators return dicts.
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": base64.b64encode(state).decode("ascii")}
    return {"kind": "json", "value": state}


def _decode_iterator_state(encoded: dict[str, Any]) -> Any:
    if encoded["kind"] == "bytes":
        return base64.b64decode(encoded["value"])
    return encoded.get("value")


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    *,
    step: int,
    data_iterator: Any = None,
    backbone: dict[str, str] | None = None,
    references: dict[str, dict[str, str]] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Starts an (asynchronous) save of `state`, the iterator position and metadata at `step`.

    The metadata records the SHA-256 of every array of `state` and of the iterator record
    (`metadata["checksums"]`), and of itself, so that `restore` detects corruption.

    Args:
      manager: from `make_manager`.
      state: the train state pytree (`train_lib.TrainState`); must be all finite.
      step: the step number (number of updates in `state`).
      data_iterator: an object with `get_state()`, or None.
      backbone: `backbone_reference(...)` of the frozen tree's source, or None.
      references: `{name: backbone_reference(path)}` of other frozen inputs (e.g. a router).
      extra_metadata: any JSON-serialisable dict (e.g. the config) to store alongside.

    Raises:
      FloatingPointError: if the state holds NaN/Inf (the previous checkpoints stay the newest).
    """
    checksums = integrity.tree_checksums(state, refuse_nonfinite=True)
    # Hashed after a JSON round trip: what `restore` reads back (tuples as lists, str keys).
    iterator_record = json.loads(json.dumps(_encode_iterator_state(data_iterator)))
    metadata = {
        "step": int(step),
        "backbone": backbone,
        "references": dict(references or {}),
        "extra": json.loads(json.dumps(extra_metadata or {})),
        "arrays": integrity.array_specs(state),
        "checksums": {
            "algorithm": integrity.ALGORITHM,
            "state": checksums,
            "data_iter": integrity.json_checksum(iterator_record),
        },
    }
    manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(iterator_record),
            metadata=ocp.args.JsonSave(integrity.seal(metadata)),
        ),
        force=True,
    )


class _Corrupt(Exception):
    """A step that cannot be read, or whose content does not match its recorded checksums."""


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves an unreadable step directory aside so that later saves may reuse its number."""
    source = os.fspath(manager.directory / str(step))
    target = os.path.join(os.fspath(manager.directory) + "_corrupt", f"{step}.{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
    multihost_utils.sync_global_devices(f"ir_lora_quarantine_{step}")
    manager.reload()
    return target


def _read_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        metadata = dict(restored["metadata"])
    except Exception as error:  # noqa: BLE001 - any read failure of the JSON means "unreadable".
        raise _Corrupt(f"its metadata cannot be read ({type(error).__name__}: {error})") from error
    if not integrity.seal_intact(metadata):
        raise _Corrupt(f"{manager.directory / str(step) / 'metadata'} does not match its checksum")
    return metadata


def _check_structure(manager, step: int, abstract_state: Any, metadata: dict, config) -> None:
    """Raises `CheckpointMismatchError` if the on-disk state tree does not fit `abstract_state`."""
    directory = manager.directory / str(step) / "state"
    stored = metadata.get("arrays")
    if stored is None:  # Older checkpoints: orbax's tree metadata (opens every array).
        try:
            tree = manager.item_metadata(step)["state"]
            if tree is None:
                raise FileNotFoundError(f"{directory} holds no tree metadata")
        except Exception as error:  # noqa: BLE001 - unreadable tree metadata means "unreadable".
            raise _Corrupt(
                f"its tree metadata cannot be read ({type(error).__name__}: {error})"
            ) from error
        stored = integrity.array_specs(tree)
    difference = integrity.state_mismatch(stored, abstract_state)
    if difference is not None:
        recorded = (metadata.get("extra") or {}).get("config")
        hint = integrity.describe_config_differences(recorded, config)
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {manager.directory} does not fit the state this config "
            f"builds. {hint + ' ' if hint else ''}The state differs: {difference}. Nothing on "
            "disk was changed: resume with the config the checkpoint recorded "
            f"({directory.parent / 'metadata'}, key extra.config), or use another workdir."
        )


def _read_verified(manager, step: int, abstract_state: Any, metadata: dict) -> tuple[Any, Any]:
    """`(state, iterator record)` of `step`, checked against the recorded checksums."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore()
            ),
        )
        # Reading every array forces errors from lazily loaded data to surface here.
        state = jax.block_until_ready(restored["state"])
        record = dict(restored["data_iter"])
    except Exception as error:  # noqa: BLE001 - after the structure check: unreadable data.
        if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
            raise  # The machine, not the checkpoint.
        raise _Corrupt(f"it cannot be read ({type(error).__name__}: {error})") from error
    checksums = metadata.get("checksums") or {}
    if checksums.get("algorithm") != integrity.ALGORITHM:
        # Older steps record none; another version's scheme cannot be compared with ours.
        logging.warning(
            "Checkpoint step %d in %s records no checksums this version can verify (%r): its "
            "content is not verified.", step, manager.directory, checksums.get("algorithm")
        )  # fmt: skip
        return state, record
    differing = integrity.checksum_differences(checksums["state"], integrity.tree_checksums(state))
    if differing:
        raise _Corrupt(
            f"arrays differ from the checksums recorded when it was written: "
            f"{', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''}"
        )
    if integrity.json_checksum(record) != checksums["data_iter"]:
        where = manager.directory / str(step) / "data_iter"
        raise _Corrupt(f"the iterator record in {where} differs from its recorded checksum")
    return state, record


def _set_iterator_state(manager, step: int, data_iterator, record, metadata, config) -> None:
    try:
        data_iterator.set_state(_decode_iterator_state(record))
    except Exception as error:  # noqa: BLE001 - the record is intact: the pipeline differs.
        where = manager.directory / str(step) / "data_iter"
        checked = (metadata.get("checksums") or {}).get("algorithm") == integrity.ALGORITHM
        verified = "matches its checksum" if checked else "is not checksummed"
        recorded = (metadata.get("extra") or {}).get("config")
        hint = integrity.describe_config_differences(recorded, config)
        raise CheckpointMismatchError(
            f"The data iterator rejects the position recorded in {where} ({type(error).__name__}: "
            f"{error}); the record {verified}, so the data pipeline differs from the one that "
            f"wrote it. {hint + ' ' if hint else ''}Nothing on disk was changed."
        ) from error


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    *,
    step: int | None = None,
    data_iterator: Any = None,
    backbone_path: str | os.PathLike | None = None,
    reference_paths: dict[str, str | os.PathLike] | None = None,
    verify: bool = True,
    config: Any = None,
    quarantine: bool = False,
) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest intact checkpoint (or exactly `step`) into `abstract_state`.

    Args:
      manager: from `make_manager`.
      abstract_state: pytree of `jax.ShapeDtypeStruct`s with `.sharding` (or concrete arrays),
        e.g. `jax.eval_shape` of the state with the shardings from `create_train_state`.
      step: a specific step; None means the newest, falling back to older ones when it is
        corrupt (unreadable, or its content differs from its checksums), with a warning.
      data_iterator: if given, its `set_state` receives the saved iterator position.
      backbone_path: where the frozen backbone lives now (default: the recorded path).
      reference_paths: `{name: path}`, where the other recorded frozen inputs live now (default:
        their recorded paths).
      verify: check the recorded hashes (backbone and references, where recorded).
      config: the current config, only to name the keys that differ from the recorded one in a
        `CheckpointMismatchError`.
      quarantine: move a corrupt step to `<directory>_corrupt/` (for a caller that will save new
        steps, whose numbers it frees); otherwise nothing on disk is changed.

    Returns:
      `(state, metadata)`, or None if there is no (intact) checkpoint.

    Raises:
      CheckpointMismatchError: the newest intact checkpoint does not fit `abstract_state` or
        `data_iterator` (nothing is moved, no older step is tried).
      BackboneMismatchError / ReferenceMismatchError / FileNotFoundError: a recorded frozen
        input does not match.
    """
    manager.wait_until_finished()
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    candidates = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for candidate in candidates:
        try:
            metadata = _read_metadata(manager, candidate)
            _check_structure(manager, candidate, abstract_state, metadata, config)
            if verify:
                if metadata.get("backbone"):
                    verify_backbone(metadata["backbone"], backbone_path)
                for name, reference in (metadata.get("references") or {}).items():
                    verify_reference(reference, (reference_paths or {}).get(name), name=name)
            state, record = _read_verified(manager, candidate, abstract_state, metadata)
        except _Corrupt as error:
            if step is not None:
                raise ValueError(
                    f"Checkpoint step {step} in {manager.directory}: {error}"
                ) from error
            message = (
                f"Checkpoint step {candidate} in {manager.directory} is corrupt: {str(error)[:600]}"
            )
            if quarantine:
                message += f"; moved to {_quarantine(manager, candidate)}"
            logging.error("%s; falling back to the previous step.", message)
            warnings.warn(
                f"{message}; falling back to the previous step.", RuntimeWarning, stacklevel=2
            )
            continue
        if data_iterator is not None:
            _set_iterator_state(manager, candidate, data_iterator, record, metadata, config)
        logging.info("Restored checkpoint step %d from %s", candidate, manager.directory)
        recorded = (metadata.get("extra") or {}).get("config")
        differences = integrity.config_differences(recorded, config)
        if differences:  # the state fits, so these are the user's choice: said, not refused
            logging.warning(
                "Checkpoint step %d was written with another config; continuing with this one "
                "(%s).", candidate, "; ".join(differences)
            )  # fmt: skip
        return state, metadata
    if candidates:
        warnings.warn(
            f"No intact checkpoint in {manager.directory} (steps {sorted(candidates)} are "
            "corrupt).", RuntimeWarning, stacklevel=2
        )  # fmt: skip
    return None


def latest_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata item of the newest intact step under `directory`; None without steps.

    Reads only the small JSON item, so that a run can complete its config from what its
    checkpoints recorded (e.g. a frozen input's path) before building anything.
    """
    if not os.path.isdir(directory):
        return None
    manager = make_manager(directory, create=False)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return _read_metadata(manager, step)
            except _Corrupt:
                continue  # `restore` falls back the same way.
        return None
    finally:
        manager.close()
