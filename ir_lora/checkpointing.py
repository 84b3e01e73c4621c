"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Each step directory `<workdir>/checkpoints/<step>/` holds three orbax items:

  state     the `TrainState` (step, trainable, opt_state, rng): never the frozen tree
  data_iter the data iterator's `get_state()` as JSON (grain dict or bytes), so input resumes
            exactly where it stopped
  metadata  JSON: {"step", "backbone": {"path", "sha256"} | None,
            "references": {name: {"path", "sha256"}}, "extra": {...}}

A fine-tuning checkpoint therefore holds only trainable parameters (adapters) plus a reference to
the frozen backbone, and to any other frozen input the method reads (`references`, e.g. LoRA-IR's
router); `restore` re-hashes each of them and refuses a mismatch. A newest checkpoint
that cannot be read (half-written, corrupt) is moved to `<workdir>/checkpoints_corrupt/` with a
warning and the previous one is used. Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves no step directory behind.
"""

import base64
import hashlib
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_CHUNK = 1 << 20


class ReferenceMismatchError(ValueError):
    """A frozen input on disk is not the one the checkpoint was trained against."""


class BackboneMismatchError(ReferenceMismatchError):
    """The frozen backbone on disk is not the one the checkpoint was trained against."""


def hash_path(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, or of a directory tree (deterministic over its files).

    A directory's digest covers every regular file's relative POSIX path and content, visited in
    sorted order, so it does not depend on the file system's listing order or on timestamps.

    Raises:
      FileNotFoundError: if `path` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Cannot hash {path!r}: no such file or directory")

    def file_digest(file_path: str) -> str:
        digest = hashlib.sha256()
        with open(file_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    if os.path.isfile(path):
        return file_digest(path)
    tree = hashlib.sha256()
    relative_paths = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        relative_paths += [os.path.relpath(os.path.join(root, name), path) for name in files]
    for rel in sorted(p.replace(os.sep, "/") for p in relative_paths):
        tree.update(f"{rel}\0{file_digest(os.path.join(path, rel))}\n".encode())
    return tree.hexdigest()


def backbone_reference(path: str | os.PathLike) -> dict[str, str]:
    """`{"path": absolute path, "sha256": hash_path(path)}` for a frozen file or directory."""
    return {"path": os.path.abspath(os.fspath(path)), "sha256": hash_path(path)}


def verify_reference(
    reference: dict[str, str], path: str | os.PathLike | None = None, *, name: str
) -> None:
    """Checks that the frozen `name` at `path` (default: the recorded path) has the recorded hash.

    Raises:
      FileNotFoundError: if it is missing.
      ReferenceMismatchError (BackboneMismatchError for the backbone): if its hash differs.
    """
    path = os.fspath(path) if path is not None else reference["path"]
    actual = hash_path(path)
    if actual != reference["sha256"]:
        error = BackboneMismatchError if name == "backbone" else ReferenceMismatchError
        raise error(
            f"Frozen {name} {path!r} has sha256 {actual}, but the checkpoint was trained "
            f"against {reference['path']!r} with sha256 {reference['sha256']}"
        )


def verify_backbone(reference: dict[str, str], path: str | os.PathLike | None = None) -> None:
    """`verify_reference` of the backbone (raises BackboneMismatchError)."""
    verify_reference(reference, path, name="backbone")


def make_manager(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3
) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `directory` (created if missing); saves are asynchronous."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


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


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite(state: Any) -> None:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves and not bool(_all_finite(leaves)):
        raise FloatingPointError("Refusing to checkpoint a state with NaN/Inf values")


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
    _check_finite(state)
    metadata = {
        "step": int(step),
        "backbone": backbone,
        "references": dict(references or {}),
        "extra": extra_metadata or {},
    }
    manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(_encode_iterator_state(data_iterator)),
            metadata=ocp.args.JsonSave(metadata),
        ),
        force=True,
    )


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves an unreadable step directory aside so that later saves may reuse its number."""
    source = os.fspath(manager.directory / str(step))
    target_dir = os.fspath(manager.directory) + "_corrupt"
    if jax.process_index() == 0 and os.path.exists(source):
        os.makedirs(target_dir, exist_ok=True)
        shutil.move(source, os.path.join(target_dir, f"{step}.{int(time.time())}"))
    multihost_utils.sync_global_devices(f"ir_lora_quarantine_{step}")
    manager.reload()


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    *,
    step: int | None = None,
    data_iterator: Any = None,
    backbone_path: str | os.PathLike | None = None,
    reference_paths: dict[str, str | os.PathLike] | None = None,
    verify: bool = True,
) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint (or exactly `step`) into `abstract_state`.

    Args:
      manager: from `make_manager`.
      abstract_state: pytree of `jax.ShapeDtypeStruct`s with `.sharding` (or concrete arrays),
        e.g. `jax.eval_shape` of the state with the shardings from `create_train_state`.
      step: a specific step; None means the newest, falling back to older ones when it is
        unreadable (the unreadable one is moved to `<directory>_corrupt`, with a warning).
      data_iterator: if given, its `set_state` receives the saved iterator position.
      backbone_path: where the frozen backbone lives now (default: the recorded path).
      reference_paths: `{name: path}`, where the other recorded frozen inputs live now (default:
        their recorded paths).
      verify: check the recorded hashes (backbone and references, where recorded).

    Returns:
      `(state, metadata)`, or None if there is no (readable) checkpoint.

    Raises:
      BackboneMismatchError / ReferenceMismatchError / FileNotFoundError: a recorded frozen
        input does not match.
    """
    manager.wait_until_finished()
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    candidates = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    for candidate in candidates:
        try:
            restored = manager.restore(
                candidate,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data_iter=ocp.args.JsonRestore(),
                    metadata=ocp.args.JsonRestore(),
                ),
            )
            # Reading every array forces errors from lazily loaded data to surface here.
            jax.block_until_ready(restored["state"])
        except Exception as error:  # noqa: BLE001 - any read failure means "unreadable".
            if step is not None:
                raise
            warnings.warn(
                f"Checkpoint step {candidate} in {manager.directory} is unreadable "
                f"({type(error).__name__}: {str(error)[:300]}); moving it aside and falling "
                "back to the previous one.",
                RuntimeWarning,
                stacklevel=2,
            )
            _quarantine(manager, candidate)
            continue
        metadata = dict(restored["metadata"])
        if verify:
            if metadata.get("backbone"):
                verify_backbone(metadata["backbone"], backbone_path)
            for name, reference in (metadata.get("references") or {}).items():
                verify_reference(reference, (reference_paths or {}).get(name), name=name)
        if data_iterator is not None:
            iterator_state = _decode_iterator_state(dict(restored["data_iter"]))
            if iterator_state is not None:
                data_iterator.set_state(iterator_state)
        logging.info("Restored checkpoint step %d from %s", candidate, manager.directory)
        return restored["state"], metadata
    return None


def latest_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata item of the newest readable step under `directory`; None without steps.

    Reads only the small JSON item, so that a run can complete its config from what its
    checkpoints recorded (e.g. a frozen input's path) before building anything.
    """
    if not os.path.isdir(directory):
        return None
    manager = make_manager(directory)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(
                    step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
                )
            except Exception:  # noqa: BLE001 - unreadable: `restore` falls back the same way.
                continue
            return dict(restored["metadata"])
        return None
    finally:
        manager.close()
