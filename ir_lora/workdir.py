"""One run per workdir: an exclusive lock on `<workdir>/.lock`, taken before a run writes.

Two runs that share a workdir overwrite each other's checkpoints, exports and tables, so
`train.py` `acquire`s it for the whole run and a second run fails at once with
`WorkdirLockedError` naming the holder (host, pid, command, start time, from the lock file).

The lock is `fcntl.flock`: the kernel drops it when the holding process ends, however it ends
(kill -9 included), so a stale `.lock` file left by a dead run never blocks the next one; its
content is only there to name the holder. On NFS, Linux emulates flock with POSIX locks, which
the server arbitrates between hosts.

A multi-host run is one run of several processes sharing the workdir: process 0 takes the lock
for all of them and tells the others whether it got it, so that either every process of a
second run fails with the same error or none does (and none waits on a collective for a peer
that has exited). Object stores (`gs://...`) cannot be locked: there the lock is skipped with a
warning.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator

LOCK_FILE = ".lock"

# {absolute workdir: [fd, depth]}: a process that holds a workdir's lock may take it again (e.g.
# train.py around the whole run, a library call inside it) without locking itself out.
_HELD: dict[str, list[int]] = {}


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def exit_refused(error: WorkdirLockedError, code: int = 3):
    """Ends a refused process of a multi-host run at once: prints `error`, skips the teardown.

    Such a process holds nothing and has written nothing. The interpreter's normal exit runs
    JAX's native teardown, which after a collective can wait for the other processes
    indefinitely: on this project's CPU with gloo, about one refused two-process run in ten
    hung there (both processes, past every Python frame) instead of exiting.
    """
    print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return (
            f"pid {info['pid']} on {info['host']} since {info['started']}: "
            f"{' '.join(info['command'])}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself in it"


def _record(fd: int) -> None:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": [sys.executable, *sys.argv],
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)


def _acquire(workdir: str) -> str | None:
    """Locks `workdir` for this process; None on success, else the holder's description."""
    if workdir in _HELD:
        _HELD[workdir][1] += 1
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _holder(path)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        logging.warning("Cannot lock %s (%s): nothing stops a second run on it.", path, error)
        _HELD[workdir] = [-1, 1]
        return None
    _record(fd)
    _HELD[workdir] = [fd, 1]
    return None


def _release(workdir: str) -> None:
    held = _HELD[workdir]
    held[1] -= 1
    if held[1] == 0:
        del _HELD[workdir]
        if held[0] >= 0:
            os.close(held[0])  # closing the last descriptor drops the flock


def _agree_across_processes(locked: bool) -> bool:
    """Process 0's answer, on every process of a multi-host run."""
    import jax  # Only here: a single-process lock needs no JAX.

    if jax.process_count() == 1:
        return locked
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(locked)))


def acquire(workdir: str | os.PathLike, *, multihost: bool = True) -> None:
    """Takes the exclusive lock on `workdir` (created if missing) until `release` or exit.

    Args:
      workdir: the run's directory.
      multihost: with several JAX processes, process 0 locks for all of them (call it on every
        process, after `jax.distributed.initialize`); False: each caller locks for itself.

    Raises:
      WorkdirLockedError: another live run holds it (on every process of a multi-host run).
    """
    workdir = os.fspath(workdir)
    if "://" in workdir:
        logging.warning("Cannot lock %s (an object store): nothing stops a second run.", workdir)
        return
    workdir = os.path.abspath(workdir)
    leader = not multihost or _process_index() == 0
    holder, error = None, None
    if leader:
        try:
            holder = _acquire(workdir)
        except OSError as raised:  # e.g. no permission: the other processes must not wait
            error = raised
    locked = holder is None and error is None
    if multihost and not _agree_across_processes(locked):
        if error is not None:
            raise error
        if holder is None:  # not process 0: it found the lock held, or failed (see its error)
            holder = _holder(os.path.join(workdir, LOCK_FILE)) + ", as process 0 found"
    if error is not None:
        raise error
    if holder is not None:
        raise WorkdirLockedError(
            f"Workdir {workdir} is in use by another run ({holder}); wait for it to finish or "
            "choose another --workdir."
        )


def release(workdir: str | os.PathLike, *, multihost: bool = True) -> None:
    """Gives back a lock taken by `acquire` (with the same arguments)."""
    workdir = os.fspath(workdir)
    if "://" in workdir or (multihost and _process_index() != 0):
        return
    _release(os.path.abspath(workdir))


def _process_index() -> int:
    import jax

    return jax.process_index()


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, *, multihost: bool = True) -> Iterator[None]:
    """`acquire` for the `with` block, then `release`."""
    acquire(workdir, multihost=multihost)
    try:
        yield
    finally:
        release(workdir, multihost=multihost)
