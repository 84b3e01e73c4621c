"""Hashes of the frozen inputs a checkpoint was trained against (backbone, routers, ...).

A fine-tuning checkpoint holds only what trains; the frozen backbone and any other frozen input
the method reads are recorded as `{"path", "sha256"}` and re-hashed before a restore, so a run
is never resumed or evaluated on other weights than it trained with.
"""

import hashlib
import os

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
