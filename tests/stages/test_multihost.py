"""`train.py` as two JAX processes on localhost (2 CPU devices each), from a fresh workdir.

Both processes start on a workdir with no prepared data: process 0 prepares it, the other waits
(before, both prepared at once and one died on TFDS's rename). The run trains 4 steps with
checkpoints at 2 and 4; then checkpoint 4 and the export are removed and the two processes
resume from step 2, which must end at the same parameters.
"""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp

from ir_lora import data

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_file(path, photos) -> str:
    path.write_text(
        textwrap.dedent(
            f"""
            from configs import pretrain_prod


            def get_config(arg=None):
                config = pretrain_prod.get_config("variant=nafnet-tiny")
                config.unlock()
                config.data.source_dir = {str(photos)!r}
                config.data.gt_size = 16
                config.data.batch_size = 4
                config.num_train_steps = 4
                config.checkpoint_every_steps = 2
                config.log_every_steps = 2
                config.prod.ops = ("noise",)  # the smallest PROD program to compile
                config.prod.max_degradations = 1
                config.lock()
                return config
            """
        )
    )
    return str(path)


def _train_two_processes(config, workdir, cache, log_dir, tag):
    port = _free_port()
    processes = []
    with contextlib.ExitStack() as stack:
        for index in range(2):
            env = {
                **os.environ,
                "PYTHONPATH": _ROOT,
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "JAX_PLATFORMS": "cpu",
                # Tiny programs: XLA's optimisation passes cost more than they save; the
                # resumed run reuses the first run's compiled programs.
                "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
                "JAX_COMPILATION_CACHE_DIR": str(cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            }
            log = stack.enter_context(open(log_dir / f"{tag}_{index}.log", "wb"))
            command = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir)]
            processes.append(
                subprocess.Popen(command, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        try:
            codes = [p.wait(timeout=600) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    texts = [(log_dir / f"{tag}_{i}.log").read_text(errors="replace") for i in range(2)]
    assert codes == [0, 0], "\n\n".join(t[-4000:] for t in texts)
    return texts


def _params(workdir):
    return ocp.StandardCheckpointer().restore(str(workdir / "export" / "params"))


def test_train_py_two_processes_from_scratch_then_resume(tmp_path):
    photos = data.write_sample_folder(str(tmp_path / "photos"), max_side=48)
    config = _config_file(tmp_path / "tiny_prod.py", photos)
    workdir, cache = tmp_path / "run", tmp_path / "jax_cache"

    texts = _train_two_processes(config, workdir, cache, tmp_path, "fresh")
    assert "waits for process 0 to prepare" in texts[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert "data_wait_fraction" in texts[0]
    uninterrupted = _params(workdir)

    # As if the run had died after step 2: its last checkpoint and export are gone.
    for path in (workdir / "checkpoints" / "4", workdir / "export"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    texts = _train_two_processes(config, workdir, cache, tmp_path, "resumed")
    assert all("Resuming from step 2." in t for t in texts)
    resumed = _params(workdir)
    flat_a = dict(zip(*_flatten(uninterrupted)))
    flat_b = dict(zip(*_flatten(resumed)))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_b[key], flat_a[key], rtol=1e-6, atol=1e-7, err_msg=key)


def _flatten(tree):
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(k) for k, _ in leaves], [np.asarray(v) for _, v in leaves]
