"""One run per workdir (`ir_lora.workdir`), and what train.py / eval.py check before they write."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from configs import finetune_lora, quickstart
from ir_lora import preflight, workdir

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "PYTHONPATH": _ROOT}

# Holds the lock of argv[1] (argv[2]: "multihost" to initialise JAX with process id argv[3] of 2
# at coordinator argv[4]), reports one line, then waits until argv[-1] exists or it is killed.
# The report goes to the original stdout alone: JAX's CPU collectives (gloo) print to file
# descriptor 1 from their own threads, which would splice their text into the report.
_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    multihost = sys.argv[2] == "multihost"
    if multihost:
        import jax
        jax.distributed.initialize(sys.argv[4], num_processes=2, process_id=int(sys.argv[3]))
    from ir_lora import workdir
    try:
        workdir.acquire(sys.argv[1], multihost=multihost)
    except workdir.WorkdirLockedError as error:
        print("refused", error, file=report, flush=True)
        if multihost:
            workdir.exit_refused(error)  # what train.py does (ir_lora.cli.run)
        sys.exit(3)
    print("locked", os.getpid(), file=report, flush=True)
    while not os.path.exists(sys.argv[-1]):
        time.sleep(0.05)
    """
)


def _start_holder(*args):
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, *map(str, args)],
        env=_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _first_line(process):
    """The holder's one line ("" if it died first)."""
    return process.stdout.readline().strip()


def test_second_run_fails_at_once_naming_the_holder_and_a_dead_one_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run, "single", tmp_path / "stop")
    try:
        assert _first_line(holder) == f"locked {holder.pid}"
        with pytest.raises(workdir.WorkdirLockedError, match=rf"in use .*pid {holder.pid} on "):
            workdir.acquire(run, multihost=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind
        holder.wait()
    assert (run / workdir.LOCK_FILE).exists()
    with workdir.lock(run, multihost=False):  # the dead holder's file does not block
        with workdir.lock(run, multihost=False):  # the holder itself may take it again
            pass
        second = _start_holder(run, "single", tmp_path / "stop")
        assert _first_line(second).startswith(f"refused Workdir {run} is in use by another run")
        assert second.wait() == 3
    third = _start_holder(run, "single", tmp_path / "stop")  # released: free again
    assert _first_line(third) == f"locked {third.pid}"
    (tmp_path / "stop").touch()
    assert third.wait() == 0


def _first_line_of_lock(run):
    return workdir._holder(str(run / workdir.LOCK_FILE))


_WAIT = "wait for it to finish or choose another --workdir."


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_of_one_multihost_run_share_the_lock_and_all_fail_together(tmp_path):
    run, stop = tmp_path / "run", tmp_path / "stop"
    address = f"127.0.0.1:{_free_port()}"
    pair = [_start_holder(run, "multihost", i, address, stop) for i in range(2)]
    try:
        lines = [_first_line(p) for p in pair]
        # Process 0 locked for both; a single-process run is refused meanwhile.
        assert lines == [f"locked {pair[0].pid}", f"locked {pair[1].pid}"]
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {pair[0].pid}"):
            workdir.acquire(run, multihost=False)
        # A second two-process run on the same workdir: both of its processes give up at once,
        # with the same message, and leave together (neither locks, trains or waits).
        address = f"127.0.0.1:{_free_port()}"
        rivals = [_start_holder(run, "multihost", i, address, stop) for i in range(2)]
        message = f"refused Workdir {run} is in use by another run ({_first_line_of_lock(run)}"
        assert _first_line(rivals[0]) == f"{message}); {_WAIT}"
        assert _first_line(rivals[1]) == f"{message}, as process 0 found); {_WAIT}"
        assert [p.wait(timeout=120) for p in rivals] == [3, 3]
    finally:
        stop.touch()
        for process in pair:
            process.wait(timeout=120)
    assert [p.returncode for p in pair] == [0, 0]


def _train_py(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, os.path.join(_ROOT, "train.py"), *flags],
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_py_refuses_a_held_workdir_before_writing(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run, "single", tmp_path / "stop")
    try:
        assert _first_line(holder) == f"locked {holder.pid}"
        result = _train_py(tmp_path, "--config", "configs/quickstart.py", f"--workdir={run}")
    finally:
        (tmp_path / "stop").touch()
        holder.wait()
    assert result.returncode != 0
    assert f"is in use by another run (pid {holder.pid}" in result.stderr
    assert os.listdir(run) == [workdir.LOCK_FILE]


def test_batch_size_that_does_not_split_over_the_devices_fails_before_writing(tmp_path):
    config = quickstart.get_config()
    preflight.check_batch_sizes(config, device_count=8)
    with pytest.raises(ValueError, match=r"config.finetune.data.batch_size=8 .* devices \(16\)"):
        preflight.check_batch_sizes(config, device_count=16)
    config = finetune_lora.get_config()
    config.data.batch_size = 12
    with pytest.raises(
        ValueError, match=r"config.data.batch_size=12 .*\(8\).*Use e.g. config.data.batch_size=8\."
    ):
        preflight.check_batch_sizes(config, device_count=8)

    # Through train.py (8 simulated devices, see conftest.py): nothing is created.
    run = tmp_path / "run"
    result = _train_py(
        tmp_path, "--config", "configs/finetune_lora.py", f"--workdir={run}",
        "--config.data.batch_size=12", "--config.init.checkpoint=/nowhere",
    )  # fmt: skip
    assert result.returncode != 0
    assert "config.data.batch_size=12 is not a positive multiple of the number of devices (8)" in (
        result.stderr
    )
    assert not run.exists()


def test_eval_py_of_a_missing_workdir_creates_nothing(tmp_path):
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "eval.py"), "--config=configs/lora_ir_allinone.py",
         f"--workdir={missing}"],
        env=_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"Workdir '{missing}' does not exist" in result.stderr
    assert not missing.exists()
