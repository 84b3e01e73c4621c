"""Checkpoint round trips, backbone hashes, corrupt-newest fallback, NaN stop, kill -9 resume;
a config that does not fit is an error that changes nothing, silent corruption is detected."""

import functools
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_training as tiny
from clu import values as clu_values

from ir_lora import checkpointing, train_lib, trainer
from ir_lora import sharding as sharding_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@functools.cache
def _fresh_state(seed=0):
    tx = train_lib.make_optimizer(tiny.small_config(4).optimizer, num_train_steps=4)
    state, *_ = train_lib.create_train_state(
        init_fn=tiny.make_method().init_fn, tx=tx, rng=seed, mesh=sharding_lib.make_mesh()
    )
    return state


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_hash_path_is_deterministic_and_content_sensitive(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(str(a / "x.bin"), b"one")
    _write(str(a / "sub" / "y.bin"), b"two")
    _write(str(b / "sub" / "y.bin"), b"two")  # same tree, created in the other order
    _write(str(b / "x.bin"), b"one")
    assert checkpointing.hash_path(a) == checkpointing.hash_path(b)
    assert checkpointing.hash_path(a / "x.bin") == hashlib.sha256(b"one").hexdigest()
    _write(str(b / "x.bin"), b"One")
    assert checkpointing.hash_path(a) != checkpointing.hash_path(b)
    os.rename(b / "x.bin", b / "z.bin")
    _write(str(b / "z.bin"), b"one")
    assert checkpointing.hash_path(a) != checkpointing.hash_path(b)  # names count too
    with pytest.raises(FileNotFoundError, match="missing"):
        checkpointing.hash_path(tmp_path / "missing")


def test_round_trip_with_iterator_state_and_backbone_check(tmp_path):
    backbone = tmp_path / "backbone.msgpack"
    _write(str(backbone), b"pretrained weights")
    state = _fresh_state()
    iterator = tiny.CountingIterator()
    for _ in range(5):
        next(iterator)
    manager = checkpointing.make_manager(tmp_path / "ckpt")
    checkpointing.save(
        manager,
        state,
        step=5,
        data_iterator=iterator,
        backbone=checkpointing.backbone_reference(backbone),
        extra_metadata={"config": {"lr": 0.01}},
    )
    resumed_iterator = tiny.CountingIterator()
    restored, metadata = checkpointing.restore(
        manager, _fresh_state(seed=1), data_iterator=resumed_iterator
    )
    _assert_trees_equal(restored, state)
    assert (
        restored.trainable["conv_out"]["kernel"].sharding
        == state.trainable["conv_out"]["kernel"].sharding
    )
    assert resumed_iterator.position == 5
    assert metadata["step"] == 5 and metadata["extra"] == {"config": {"lr": 0.01}}
    assert metadata["backbone"]["sha256"] == hashlib.sha256(b"pretrained weights").hexdigest()
    # Only trainable parameters are stored: the frozen conv_in is nowhere in the checkpoint.
    with open(tmp_path / "ckpt" / "5" / "state" / "_METADATA") as f:
        stored = f.read()
    assert "conv_out" in stored and "conv_in" not in stored

    _write(str(backbone), b"other weights")
    with pytest.raises(checkpointing.BackboneMismatchError, match="backbone.msgpack.*sha256"):
        checkpointing.restore(manager, state)
    moved = tmp_path / "moved.msgpack"
    _write(str(moved), b"pretrained weights")
    assert checkpointing.restore(manager, state, backbone_path=moved) is not None


def test_other_frozen_inputs_are_recorded_and_checked_by_name(tmp_path):
    router = tmp_path / "router.bin"
    _write(str(router), b"router weights")
    state = _fresh_state()
    manager = checkpointing.make_manager(tmp_path / "ckpt")
    reference = checkpointing.backbone_reference(router)
    checkpointing.save(manager, state, step=3, references={"router": reference})
    manager.wait_until_finished()
    assert checkpointing.latest_metadata(tmp_path / "ckpt")["references"] == {"router": reference}
    assert checkpointing.latest_metadata(tmp_path / "none") is None
    assert checkpointing.restore(manager, state) is not None

    other = tmp_path / "other.bin"
    _write(str(other), b"another router")
    with pytest.raises(checkpointing.ReferenceMismatchError, match="router.*other.bin.*router.bin"):
        checkpointing.restore(manager, state, reference_paths={"router": other})
    _write(str(router), b"retrained router")
    with pytest.raises(checkpointing.ReferenceMismatchError, match="Frozen router") as error:
        checkpointing.restore(manager, state)
    assert not isinstance(error.value, checkpointing.BackboneMismatchError)


def test_bytes_iterator_state_round_trip(tmp_path):
    class BytesIterator:  # like grain's DataLoader iterator
        state = b'{"last_seen_indices": {"0": 7}}'

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

    manager = checkpointing.make_manager(tmp_path)
    state = _fresh_state()
    checkpointing.save(manager, state, step=1, data_iterator=BytesIterator())
    target = BytesIterator()
    target.state = b""
    checkpointing.restore(manager, state, data_iterator=target)
    assert target.state == b'{"last_seen_indices": {"0": 7}}'


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    manager = checkpointing.make_manager(tmp_path / "ckpt")
    old, new = _fresh_state(seed=0), _fresh_state(seed=1)
    checkpointing.save(manager, old, step=2)
    checkpointing.save(manager, new, step=4)
    manager.wait_until_finished()
    data_files = glob.glob(f"{tmp_path}/ckpt/4/state/**/d/*", recursive=True)
    assert data_files
    for path in data_files:
        _write(path, b"\x00garbage" * 8)
    # A reader (evaluation) falls back and leaves the corrupt step where it is.
    with pytest.warns(RuntimeWarning, match="step 4 .* corrupt.*cannot be read"):
        restored, metadata = checkpointing.restore(manager, new)
    assert metadata["step"] == 2
    assert manager.all_steps() == [2, 4]
    # The trainer (quarantine=True) moves it aside, kept, so that step 4 can be saved again.
    with pytest.warns(RuntimeWarning, match="step 4 .* corrupt.*moved to .*ckpt_corrupt/4"):
        restored, metadata = checkpointing.restore(manager, new, quarantine=True)
    assert metadata["step"] == 2
    _assert_trees_equal(restored, old)
    assert manager.all_steps() == [2]
    assert len(glob.glob(f"{tmp_path}/ckpt_corrupt/4.*")) == 1
    # The step number is free again.
    checkpointing.save(manager, new, step=4)
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]


def test_refuses_to_save_nan(tmp_path):
    state = _fresh_state()
    bad = state.replace(trainable=jax.tree.map(lambda x: x * np.nan, state.trainable))
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        checkpointing.save(checkpointing.make_manager(tmp_path), bad, step=1)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny.small_config(8)
    # Batch index 4 feeds step 5; the check at step 6 (log + save) must stop the run.
    iterator = tiny.CountingIterator(nan_at=4)
    with pytest.raises(FloatingPointError, match=r"between steps 5 and 6.*checkpoint is step 4"):
        trainer.train(config, tmp_path, method=tiny.make_method(), data_iterator=iterator)
    manager = checkpointing.make_manager(tmp_path / "checkpoints")
    assert manager.all_steps() == [2, 4]
    restored, metadata = checkpointing.restore(manager, _fresh_state())
    assert metadata["step"] == int(restored.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def test_resume_after_kill_9_continues_exactly(tmp_path):
    num_steps = 10
    killed_dir, clean_dir = str(tmp_path / "killed"), str(tmp_path / "clean")
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.join(_HERE, "tiny_training.py"),
            killed_dir,
            str(num_steps),
            "0.5",
        ],
        env={**os.environ, "PYTHONPATH": os.path.dirname(_HERE)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.isdir(os.path.join(killed_dir, "checkpoints", "4")):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.kill()  # SIGKILL: no clean-up of any kind
        assert process.wait() == -9
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not os.path.exists(os.path.join(killed_dir, "final.npz"))

    class CountingDraws(tiny.CountingIterator):
        draws = 0

        def __next__(self):
            self.draws += 1
            return super().__next__()

    resumed_iterator = CountingDraws()
    config = tiny.small_config(num_steps)
    resumed, _ = trainer.train(
        config, killed_dir, method=tiny.make_method(), data_iterator=resumed_iterator
    )
    # It resumed from a checkpoint at step 4 or later rather than starting again.
    assert resumed_iterator.draws in (2, 4, 6)
    assert resumed_iterator.position == num_steps
    uninterrupted, _ = trainer.train(
        config,
        clean_dir,
        method=tiny.make_method(),
        data_iterator=tiny.CountingIterator(),
        eval_fn=lambda state, frozen: {
            "eval_step": int(state.step),
            "eval_sample": clu_values.Image(np.full((4, 5, 3), 0.5, np.float32)),
        },
    )
    _assert_trees_equal(resumed, uninterrupted, atol=1e-6)
    # Logs and evaluations of the uninterrupted run landed in its TensorBoard event file.
    events = tiny.read_events(clean_dir)
    tags = {(v.tag, e.step) for e in events for v in e.summary.value}
    assert {("train_loss", 2), ("train_psnr", 10), ("train_l2_grads", 10)} <= tags
    assert {("eval_step", 10), ("eval_sample", 10), ("steps_per_sec", 10)} <= tags
    steps = [e.step for e in events for v in e.summary.value if v.tag == "eval_step"]
    assert steps == [10]


def test_grain_iterator_resumes_where_it_stopped(tmp_path):
    dataset = grain.MapDataset.range(50).shuffle(seed=3).batch(2).to_iter_dataset()
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    manager = checkpointing.make_manager(tmp_path)
    checkpointing.save(manager, _fresh_state(), step=3, data_iterator=iterator)
    expected = [next(iterator).tolist() for _ in range(2)]
    resumed = iter(dataset)
    checkpointing.restore(manager, _fresh_state(), data_iterator=resumed)
    assert [next(resumed).tolist() for _ in range(2)] == expected


def _snapshot(directory):
    """`{relative path: sha256}` of every file under `directory` (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = checkpointing.hash_path(path)
    return out


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A finished 4-step run of the tiny method (checkpoints at steps 2 and 4)."""
    workdir = tmp_path_factory.mktemp("trained")
    trainer.train(
        tiny.small_config(4),
        workdir,
        method=tiny.make_method(),
        data_iterator=tiny.CountingIterator(),
    )
    return workdir


def _copy_run(trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    return workdir


def test_another_optimizer_is_an_error_that_names_the_config_key(trained_workdir, tmp_path):
    workdir = _copy_run(trained_workdir, tmp_path)
    before = _snapshot(workdir)
    config = tiny.small_config(8)  # more steps: the run would continue if the state fitted
    config.optimizer.grad_clip_norm = 0.0  # one optax transform less in opt_state
    with pytest.raises(checkpointing.CheckpointMismatchError) as error:
        trainer.train(
            config, workdir, method=tiny.make_method(), data_iterator=tiny.CountingIterator()
        )
    message = str(error.value)
    assert "step 4" in message and "opt_state/" in message
    assert "optimizer.grad_clip_norm: 1.0 in the checkpoint, 0.0 now" in message
    assert "num_train_steps: 4 in the checkpoint, 8 now" in message
    # Nothing moved, nothing overwritten, no event file or checkpoints_corrupt/ added.
    assert _snapshot(workdir) == before


def test_resuming_with_a_config_that_fits_says_what_differs(trained_workdir, tmp_path, caplog):
    workdir = _copy_run(trained_workdir, tmp_path)
    config = tiny.small_config(4)
    config.optimizer.lr = 5e-3  # the same state tree: resumable, but worth a line in the log
    with caplog.at_level("WARNING"):
        state, _ = trainer.train(
            config, workdir, method=tiny.make_method(), data_iterator=tiny.CountingIterator()
        )
    assert int(state.step) == 4
    assert "optimizer.lr: 0.01 in the checkpoint, 0.005 now" in caplog.text


def test_another_shape_is_an_error_that_names_the_arrays(trained_workdir, tmp_path):
    workdir = _copy_run(trained_workdir, tmp_path)
    before = _snapshot(workdir)
    method = tiny.make_method(features=8)  # conv_out reads 8 channels instead of 4
    manager = checkpointing.make_manager(workdir / "checkpoints", create=False)
    state, *_ = train_lib.create_train_state(
        init_fn=method.init_fn,
        tx=train_lib.make_optimizer(tiny.small_config(4).optimizer, num_train_steps=4),
        rng=0,
        mesh=sharding_lib.make_mesh(),
    )
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"The config is the one the checkpoint recorded.*trainable/conv_out/kernel is "
        r"float32\[3, 3, 4, 3\] in the checkpoint, float32\[3, 3, 8, 3\] now",
    ):
        checkpointing.restore(manager, state, config=tiny.small_config(4))
    assert _snapshot(workdir) == before


def _flip_bytes(path, count=64):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    _write(path, bytes(data))


def test_flipped_bytes_in_a_data_file_are_detected_and_fall_back(tmp_path):
    """Raw float32 chunks decode whatever their bytes: only the recorded SHA-256 tells."""
    rng = np.random.default_rng(0)
    old, new = ({"w": jax.numpy.asarray(rng.normal(size=(128, 128)), "float32")} for _ in "ab")
    manager = checkpointing.make_manager(tmp_path / "ckpt")
    checkpointing.save(manager, old, step=2)
    checkpointing.save(manager, new, step=4)
    manager.wait_until_finished()
    data_files = glob.glob(f"{tmp_path}/ckpt/4/state/**/d/*", recursive=True)
    _flip_bytes(max(data_files, key=os.path.getsize))
    with pytest.warns(RuntimeWarning, match="step 4 .* corrupt: arrays differ from the "
                      "checksums recorded when it was written: w"):  # fmt: skip
        restored, metadata = checkpointing.restore(manager, new)
    assert metadata["step"] == 2
    _assert_trees_equal(restored, old)
    with pytest.raises(ValueError, match="step 4 .* arrays differ"):
        checkpointing.restore(manager, new, step=4)  # an explicit step does not fall back


def _edit_json(path, edit):
    with open(path) as f:
        record = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(record), f)


def test_edited_iterator_record_or_metadata_falls_back_naming_the_file(trained_workdir, tmp_path):
    workdir = _copy_run(trained_workdir, tmp_path)
    manager = checkpointing.make_manager(workdir / "checkpoints")
    record = workdir / "checkpoints" / "4" / "data_iter" / "metadata"
    # The record loses its key: before checksums, set_state died with a bare KeyError.
    _edit_json(record, lambda r: {**r, "value": {"pos": r["value"]["position"]}})
    iterator = tiny.CountingIterator()
    with pytest.warns(RuntimeWarning, match="step 4 .* iterator record in .*4/data_iter differs"):
        restored, metadata = checkpointing.restore(manager, _fresh_state(), data_iterator=iterator)
    assert metadata["step"] == int(restored.step) == 2 and iterator.position == 2

    _edit_json(workdir / "checkpoints" / "2" / "metadata" / "metadata",
               lambda m: {**m, "extra": {"config": {"seed": 1}}})  # fmt: skip
    with pytest.warns(RuntimeWarning, match="step 2 .*/2/metadata does not match its checksum"):
        assert checkpointing.restore(manager, _fresh_state()) is None
    # latest_metadata reads only the metadata items: step 4's is intact, step 2's is not.
    assert checkpointing.latest_metadata(workdir / "checkpoints")["step"] == 4


def test_intact_iterator_record_the_pipeline_rejects_is_a_mismatch(trained_workdir, tmp_path):
    workdir = _copy_run(trained_workdir, tmp_path)
    before = _snapshot(workdir)

    class OtherPipeline(tiny.CountingIterator):
        def set_state(self, state):
            self.position = int(state["next_index"])  # a grain-style record, say

    manager = checkpointing.make_manager(workdir / "checkpoints")
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"rejects the position recorded in .*4/data_iter \(KeyError: 'next_index'\); "
        "the record matches its checksum",
    ):
        checkpointing.restore(
            manager, _fresh_state(), data_iterator=OtherPipeline(), config=tiny.small_config(4)
        )
    assert _snapshot(workdir) == before


def test_checkpoints_without_checksums_still_restore(tmp_path):
    """Steps written before checksums were recorded restore, unverified (with a log line)."""
    state = _fresh_state()
    manager = checkpointing.make_manager(tmp_path)
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave({"kind": "json", "value": {"position": 3}}),
            metadata=ocp.args.JsonSave({"step": 3, "backbone": None, "references": {}}),
        ),
    )
    iterator = tiny.CountingIterator()
    restored, metadata = checkpointing.restore(manager, state, data_iterator=iterator)
    _assert_trees_equal(restored, state)
    assert metadata["step"] == 3 and iterator.position == 3

    # Checksums of a scheme this version does not know (a later one) are not taken for
    # corruption either: the step restores, unverified.
    checkpointing.save(manager, state, step=5)
    manager.wait_until_finished()
    path = tmp_path / "5" / "metadata" / "metadata"
    _edit_json(path, lambda m: checkpointing.integrity.seal(
        {**m, "checksums": {**m["checksums"], "algorithm": "blake3(v9)"}}))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, metadata = checkpointing.restore(manager, state)
    assert metadata["step"] == 5


def test_checksums_cover_every_dtype_and_match_a_plain_sha256(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "bf16": jax.numpy.asarray(rng.normal(size=(3, 5)), "bfloat16"),
        "f32": jax.numpy.asarray(rng.normal(size=(4,)), "float32"),
        "i32": jax.numpy.int32(7),
        "u32": jax.numpy.asarray([1, 2], "uint32"),
        "flag": jax.numpy.asarray([True, False]),
    }
    f32 = np.asarray(state["f32"])
    plain = hashlib.sha256(b"float32(4,)\0" + f32.tobytes()).hexdigest()
    assert checkpointing.integrity.array_checksum(state["f32"]) == plain
    manager = checkpointing.make_manager(tmp_path)
    checkpointing.save(manager, state, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean round trip: no corruption reported
        restored, metadata = checkpointing.restore(manager, state)
    _assert_trees_equal(restored, state)
    assert metadata["checksums"]["state"]["f32"] == plain
    assert metadata["arrays"]["bf16"] == {"dtype": "bfloat16", "shape": [3, 5]}
