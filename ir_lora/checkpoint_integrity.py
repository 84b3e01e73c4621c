"""What a checkpoint must match before it is trusted: its own checksums, the state, the config.

Two kinds of failure must never be confused (`ir_lora.checkpointing.restore` acts on them):

* **Corruption**: the bytes on disk are not the bytes that were written. `tree_checksums` records
  the SHA-256 of every array of the state when a checkpoint is written, `json_checksum` that of
  the JSON items (iterator position, metadata); a restored value that hashes differently is
  corrupt, whatever the storage layer said (orbax's default format, zarr v2 chunks in an OCDBT
  database, checks no checksum of the array data: flipped bytes in a raw chunk decode silently).
* **Mismatch**: the checkpoint is intact but is not what the current config builds (another
  optimizer, another LoRA rank). `state_mismatch` compares the paths, shapes and dtypes the
  checkpoint recorded (`array_specs`) with the state the config builds, reading no array, and
  `config_differences` names the config keys that differ from the config the checkpoint
  recorded. A mismatch is the user's to fix: it is an error, and nothing on disk is touched.
"""

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Recorded in each checkpoint next to the checksums: checksums of another scheme (a later version)
# are not compared, rather than taken for corruption. Change it with `array_checksum`.
ALGORITHM = "sha256(dtype name, shape, C-order bytes)"
# Mismatch messages list at most this many paths or config keys (then "and N more").
_MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """An intact checkpoint does not fit the current config (structure, shape or data pipeline).

    Raised instead of falling back: older checkpoints of the run would not fit either, and moving
    any of them aside would lose good work to a config mistake.
    """


def host_value(leaf: Any) -> np.ndarray:
    """The whole array on this host; arrays split over processes are gathered (every process
    calls this for the same leaves in the same order, as it does for saving)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        if not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def array_checksum(value: Any) -> str:
    """SHA-256 of an array's dtype name, shape and C-order bytes (hex)."""
    array = host_value(value)
    digest = hashlib.sha256(f"{array.dtype}{array.shape}\0".encode())
    # As bytes without a copy (bfloat16 has no buffer-protocol format of its own).
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def flat_paths(tree: Any) -> dict[str, Any]:
    """`{"a/b/0": leaf}` in orbax's serialised naming (namedtuples and dataclasses by field
    name, sequences by index), the same for a live state and for its on-disk tree metadata."""
    return ocp.tree.to_flat_dict(tree, sep="/")


def tree_checksums(tree: Any, *, refuse_nonfinite: bool = False) -> dict[str, str]:
    """`{path: array_checksum}` of every array leaf of `tree` (one host copy of each).

    Raises:
      FloatingPointError: with `refuse_nonfinite`, if a floating-point leaf holds NaN/Inf.
    """
    checksums = {}
    for path, leaf in flat_paths(tree).items():
        value = host_value(leaf)
        inexact = jnp.issubdtype(value.dtype, jnp.inexact)
        if refuse_nonfinite and inexact and not np.isfinite(value).all():
            raise FloatingPointError(f"Refusing to checkpoint a state with NaN/Inf values ({path})")
        checksums[path] = array_checksum(value)
    return checksums


def json_checksum(value: Any) -> str:
    """SHA-256 of the canonical JSON of `value` (sorted keys): equal after a JSON round trip."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with the checksum of its own canonical JSON (`metadata_sha256`)."""
    body = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return {**body, "metadata_sha256": json_checksum(body)}


def seal_intact(metadata: dict[str, Any]) -> bool:
    """Whether `seal`ed metadata still matches its checksum (unsealed, older metadata: True)."""
    return "metadata_sha256" not in metadata or seal(metadata) == metadata


def checksum_differences(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Paths whose checksum differs, or that only one side has."""
    return sorted(p for p in set(recorded) | set(actual) if recorded.get(p) != actual.get(p))


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _subtrees(paths: list[str]) -> str:
    """`paths` listed, or, when there are many, grouped into their few shallowest subtrees
    (`"opt_state/0/... (101 arrays)"`), so that a whole optimizer state reads as one entry."""
    if len(paths) <= _MAX_LISTED:
        return ", ".join(paths)
    chosen = None
    for depth in range(1, max(p.count("/") for p in paths) + 2):
        groups: dict[str, int] = {}
        for path in paths:
            head = "/".join(path.split("/")[:depth])
            groups[head] = groups.get(head, 0) + 1
        if len(groups) > _MAX_LISTED:
            break
        chosen = groups
    if chosen is None:
        return _listed(paths)
    return ", ".join(
        f"{head}/... ({count} arrays)" if count > 1 else head for head, count in chosen.items()
    )


def array_specs(tree: Any) -> dict[str, dict[str, Any]]:
    """`{path: {"dtype": "float32", "shape": [...]}}` of every array leaf (arrays, shape-dtype
    structs or orbax's on-disk `ArrayMetadata`): what a checkpoint records of its state."""
    return {
        path: {"dtype": str(getattr(leaf, "dtype", "?")), "shape": list(getattr(leaf, "shape", ()))}
        for path, leaf in flat_paths(tree).items()
    }


def state_mismatch(stored: dict[str, dict[str, Any]], expected: Any) -> str | None:
    """How the recorded `array_specs` of a checkpoint differ from the `expected` state, or None.

    Args:
      stored: `array_specs` of the checkpoint's state (recorded at save time, or read from the
        on-disk tree metadata of older checkpoints).
      expected: the state the current config builds (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
      A message naming the paths only one side has and the shapes/dtypes that differ.
    """
    expected = array_specs(expected)
    lines = []
    only_stored = sorted(set(stored) - set(expected))
    only_expected = sorted(set(expected) - set(stored))
    if only_stored:
        lines.append(f"in the checkpoint only: {_subtrees(only_stored)}")
    if only_expected:
        lines.append(f"in the state the config builds only: {_subtrees(only_expected)}")
    changed = [
        f"{path} is {stored[path]['dtype']}{stored[path]['shape']} in the checkpoint, "
        f"{expected[path]['dtype']}{expected[path]['shape']} now"
        # Parameters before their optimizer moments, which repeat the same shapes.
        for path in sorted(set(stored) & set(expected), key=lambda p: (p.startswith("opt_"), p))
        if stored[path] != expected[path]
    ]
    if changed:
        lines.append(f"shapes or dtypes differ: {_listed(changed)}")
    return "; ".join(lines) or None


def _flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out = {}
        for key, value in config.items():
            out.update(_flat_config(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: config}


def config_as_json(config: Any) -> dict[str, Any]:
    """A config (`ml_collections.ConfigDict` or mapping) as the JSON dict checkpoints record."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def config_differences(recorded: Any, current: Any) -> list[str]:
    """`"key: <recorded> in the checkpoint, <current> now"` for every differing config key."""
    if recorded is None or current is None:
        return []
    old = _flat_config(config_as_json(recorded))
    new = _flat_config(config_as_json(current))
    missing = "(absent)"
    return [
        f"{key}: {old.get(key, missing)!r} in the checkpoint, {new.get(key, missing)!r} now"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def describe_config_differences(recorded: Any, current: Any) -> str:
    """A sentence naming the config keys that differ, for an error message (or a hint)."""
    if recorded is None:
        return "The checkpoint recorded no config to compare with."
    if current is None:
        return ""
    differences = config_differences(recorded, current)
    if not differences:
        return "The config is the one the checkpoint recorded (the code that builds it changed?)."
    return f"Config keys that differ from the checkpoint's: {_listed(differences)}."
