"""Preparing data once when several processes (hosts) start from a fresh workdir.

Process 0 runs the work first while the others wait for it through the JAX coordination
service; then the others run it too. On storage that all processes share they find the data
prepared; on per-host storage each host prepares its own copy. A file lock in the target folder
makes the processes of one host (or two runs sharing a folder) take turns.

Nothing here starts JAX: without `jax.distributed.initialize()` there is one process.
"""

import contextlib
import itertools
import logging
import os

import jax

# Every process calls the coordinated work in the same order, so the n-th call of each process
# meets the n-th call of the others under one key.
_ROUNDS = itertools.count()
# Preparing a large dataset can take hours; the other processes wait that long.
WAIT_TIMEOUT_MS = 24 * 3600 * 1000


def _processes() -> tuple[int, int, object]:
    """`(process index, process count, coordination client)` without initialising a backend."""
    if not jax.distributed.is_initialized():
        return 0, 1, None
    from jax._src import distributed  # The key-value store has no public interface.

    state = distributed.global_state
    return int(state.process_id), int(state.num_processes), state.client


@contextlib.contextmanager
def folder_lock(folder: str):
    """An exclusive `flock` on `<folder>/.ir_lora.lock`, where the file system supports it."""
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Not POSIX: no lock.
        yield
        return
    with open(os.path.join(folder, ".ir_lora.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # Some network and FUSE file systems refuse locks.
            logging.debug("No lock on %s (%s); relying on process 0 going first.", folder, e)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def first_process_then_others(fn, *, folder: str, what: str):
    """Returns `fn()`, run on process 0 before any other process runs it.

    Args:
      fn: the work, e.g. preparing a dataset (it must find finished work and return quickly).
      folder: where the work writes; locked while `fn` runs.
      what: the work in words, for errors and logs.

    Raises:
      Whatever `fn` raises on this process; on the other processes, a `RuntimeError` quoting
      process 0's error.
    """
    index, count, client = _processes()
    if count == 1 or client is None:
        with folder_lock(folder):
            return fn()
    key = f"ir_lora/first_process/{next(_ROUNDS)}"
    if index == 0:
        try:
            with folder_lock(folder):
                result = fn()
        except BaseException as e:
            client.key_value_set(key, f"error: {type(e).__name__}: {e}")
            raise
        client.key_value_set(key, "done")
        return result
    logging.info("Process %d waits for process 0 to %s.", index, what)
    status = client.blocking_key_value_get(key, WAIT_TIMEOUT_MS)
    if status != "done":
        raise RuntimeError(f"Process 0 failed to {what}: {status.removeprefix('error: ')}")
    with folder_lock(folder):
        return fn()
