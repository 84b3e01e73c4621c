"""Checks a run makes before it writes anything: what would otherwise fail after files exist.

`train.py` calls `check_run(config)` right after JAX starts and before it locks or creates the
workdir; `eval.py` calls `require_workdir` before it builds anything.
"""

import os
from collections.abc import Iterator
from typing import Any


def _batch_sizes(config: Any, prefix: str = "config") -> Iterator[tuple[str, int]]:
    """`("config.<section>.data.batch_size", value)` for every section that sets one."""
    if not hasattr(config, "items"):
        return
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if key == "data" and hasattr(value, "get") and value.get("batch_size") is not None:
            yield f"{name}.batch_size", int(value.get("batch_size"))
        elif hasattr(value, "items"):
            yield from _batch_sizes(value, name)


def check_batch_sizes(config: Any, *, device_count: int | None = None) -> None:
    """Every `data.batch_size` of `config` (top level or any stage section) splits evenly.

    Each global batch is split over all devices of the mesh (and so over all processes); a size
    that does not divide would fail at the first step, after data preparation and checkpoints.

    Args:
      config: the run's config.
      device_count: default `jax.device_count()` (every device of every process).

    Raises:
      ValueError: naming the key, its value and the device count.
    """
    if device_count is None:
        import jax

        device_count = jax.device_count()
    for name, size in _batch_sizes(config):
        if size < 1 or size % device_count:
            nearest = max(device_count, size // device_count * device_count)
            raise ValueError(
                f"{name}={size} is not a positive multiple of the number of devices "
                f"({device_count}): every global batch is split evenly over all devices of all "
                f"processes. Use e.g. {name}={nearest}."
            )


def check_run(config: Any) -> None:
    """All checks `train.py` makes before it writes (now: `check_batch_sizes`)."""
    check_batch_sizes(config)


def require_workdir(workdir: str | os.PathLike) -> str:
    """The absolute path of an existing training workdir.

    Raises:
      FileNotFoundError: it does not exist (and nothing is created).
    """
    path = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Workdir {path!r} does not exist: there is nothing to evaluate")
    return path
