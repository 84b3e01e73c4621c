"""What the checkpoint checksums cost: `checkpointing.save`/`restore` against plain orbax.

    python benchmarks/checkpoint_checksums.py [--variant nafnet-sidd-w32] [--reps 3]

The state is that of full training of `--variant` (params plus both AdamW moments, float32,
random values so that compression cannot shrink it). Rows, interleaved in each repetition:
`tree_checksums` alone (SHA-256 of every array, one host copy each); a plain orbax save of the
same items (state, iterator JSON, metadata JSON; waited for) and `checkpointing.save`
(checksums + that save); a plain orbax restore and `checkpointing.restore` (tree check,
restore, re-hash). Times are medians over `--reps`.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ir_lora import checkpoint_integrity, checkpointing, models


def _state(variant: str):
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)),
        models.param_shapes(variant),
    )
    return {"step": jax.numpy.int32(7), "params": params, "mu": params, "nu": params}


def _plain_save(manager, state, step):
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave({"kind": "none"}),
            metadata=ocp.args.JsonSave({"step": step}),
        ),
        force=True,
    )
    manager.wait_until_finished()


def _plain_restore(manager, state, step):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
    jax.block_until_ready(restored["state"])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nafnet-sidd-w32")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    state = _state(args.variant)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    root = tempfile.mkdtemp(prefix="ckpt_checksums_")
    rows: dict[str, list[float]] = {}
    try:
        for rep in range(args.reps + 1):  # repetition 0 warms up (and is not counted)
            plain = checkpointing.make_manager(os.path.join(root, f"plain{rep}"))
            checked = checkpointing.make_manager(os.path.join(root, f"checked{rep}"))

            def checked_save(checked=checked):
                checkpointing.save(checked, state, step=1)
                checked.wait_until_finished()

            times = {
                "tree_checksums (SHA-256 of every array)": _timed(
                    lambda: checkpoint_integrity.tree_checksums(state)
                ),
                "orbax save": _timed(lambda plain=plain: _plain_save(plain, state, 1)),
                "checkpointing.save (checksums + save)": _timed(checked_save),
                "orbax restore": _timed(lambda plain=plain: _plain_restore(plain, state, 1)),
                "checkpointing.restore (check + restore + re-hash)": _timed(
                    lambda checked=checked: checkpointing.restore(checked, state)
                ),
            }
            plain.close()
            checked.close()
            if rep:
                for name, seconds in times.items():
                    rows.setdefault(name, []).append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.variant} full-training state: {len(jax.tree.leaves(state))} arrays, "
        f"{nbytes / 2**20:.0f} MiB; backend {jax.default_backend()}; median of {args.reps}\n"
    )
    print("| operation | seconds |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {statistics.median(seconds):.2f} |")


if __name__ == "__main__":
    main()
