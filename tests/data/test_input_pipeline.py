"""Input workers, the worker-independent batch position, and the prefetcher the trainer uses."""

import json
import threading
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_training as tiny

from ir_lora import data, trainer
from ir_lora.data import pipeline, prefetch


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    folder = data.write_sample_folder(str(root / "photos"), max_side=48)
    return data.prepare("images", source_dir=folder, data_dir=str(root / "tfds"))


def test_two_workers_give_the_same_batches_and_resume_from_a_checkpoint(photos, tmp_path):
    assert photos.tiled
    kwargs = dict(gt_size=16, global_batch_size=4, seed=3, noise_sigma=[10, 30])
    expected = _take(iter(pipeline.train_dataset(photos, **kwargs)), 7)

    with_workers = pipeline.train_dataset(photos, worker_count=2, **kwargs)
    iterator = iter(with_workers)
    got = _take(iterator, 3)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    got += _take(iterator, 4)
    iterator.close()
    _assert_same_batches(expected, got)

    # Resumed with workers, and with none: the position does not depend on the worker count.
    resumed = iter(with_workers)
    manager.restore(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(resumed)))
    assert resumed.get_state() == {"next_index": 3}
    _assert_same_batches(expected[3:5], _take(resumed, 2))
    # Stepping back over the last batch (the runner's TensorBoard samples) replays it.
    state = resumed.get_state()
    workers = resumed._workers_iter
    again = next(resumed)
    resumed.set_state(state)
    _assert_same_batches([again, expected[6]], _take(resumed, 2))
    assert resumed._workers_iter is workers  # the worker processes were not restarted
    resumed.close()
    single = iter(pipeline.train_dataset(photos, **kwargs))
    single.set_state(json.loads(json.dumps(state)))
    _assert_same_batches(expected[5:7], _take(single, 2))
    manager.close()


def test_bad_iterator_state_names_the_expected_format(photos):
    iterator = iter(pipeline.train_dataset(photos, gt_size=16, global_batch_size=2, seed=0))
    with pytest.raises(ValueError, match="next_index"):
        iterator.set_state({"position": 3})


def test_worker_count_default_and_errors():
    assert pipeline.resolve_worker_count(-1) == 0  # a CPU-only host: the cores run the step
    assert pipeline.resolve_worker_count(3) == 3
    with pytest.raises(ValueError, match="worker_count"):
        pipeline.resolve_worker_count(-2)


class _Numbers:
    """0, 1, 2, ... with a checkpointable position; optionally slow, or failing at `fail_at`."""

    def __init__(self, delay=0.0, fail_at=None):
        self.position, self.delay, self.fail_at = 0, delay, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.fail_at:
            raise ValueError(f"bad record {self.position}")
        time.sleep(self.delay)
        self.position += 1
        return self.position - 1

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_prefetcher_state_is_that_of_the_items_handed_out():
    source = _Numbers()
    threads = []

    def transform(x):
        threads.append(threading.current_thread().name)
        return x * 10

    with prefetch.Prefetcher(source, transform=transform, buffer_size=3) as feed:
        assert feed.get_state() == {"position": 0}
        assert _take(feed, 3) == [0, 10, 20]
        deadline = time.monotonic() + 10
        while source.position < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        # Three handed out, three in the buffer and one waiting for room: no more.
        assert source.position == 7
        assert feed.get_state() == {"position": 3}
        feed.set_state({"position": 1})
        assert _take(feed, 2) == [10, 20]
        assert feed.get_state() == {"position": 3}
    assert set(threads) == {"prefetch"}


def test_prefetcher_reads_no_more_than_max_items_and_passes_errors_on():
    source = _Numbers()
    feed = prefetch.Prefetcher(source, max_items=4)
    assert list(feed) == [0, 1, 2, 3]
    assert source.position == 4
    failing = prefetch.Prefetcher(_Numbers(fail_at=2))
    assert _take(failing, 2) == [0, 1]
    with pytest.raises(ValueError, match="bad record 2"):
        next(failing)
    failing.close()


def test_wait_fraction_tells_a_slow_input_from_a_slow_consumer():
    slow_input = prefetch.Prefetcher(_Numbers(delay=0.05))
    _take(slow_input, 2)
    slow_input.take_wait_fraction()  # the interval starts after the first items
    _take(slow_input, 6)
    assert slow_input.take_wait_fraction() > 0.7
    slow_input.close()
    slow_step = prefetch.Prefetcher(_Numbers())
    next(slow_step)
    slow_step.take_wait_fraction()
    for _ in range(6):
        time.sleep(0.05)  # the "step"; the next item is ready when it ends
        next(slow_step)
    assert slow_step.take_wait_fraction() < 0.3
    slow_step.close()


def test_trainer_logs_the_data_wait_fraction(tmp_path):
    config = tiny.small_config(6)
    config.checkpoint_every_steps = 6  # no save inside the measured intervals (a loaded machine)
    # A slow input: after the first log the loop waits on nearly every step.
    iterator = tiny.CountingIterator(delay=0.3)
    trainer.train(config, tmp_path, method=tiny.make_method(), data_iterator=iterator)
    assert iterator.position == 6  # nothing read past the last step
    events = tiny.read_events(str(tmp_path))
    waits = {
        e.step: v.simple_value
        for e in events
        for v in e.summary.value
        if v.tag == "data_wait_fraction"
    }
    if not waits:  # tensorboardX may store scalars as tensors
        waits = {
            e.step: float(v.tensor.float_val[0])
            for e in events
            for v in e.summary.value
            if v.tag == "data_wait_fraction"
        }
    assert sorted(waits) == [2, 4, 6]
    assert all(0.0 <= w <= 1.0 for w in waits.values())
    assert waits[6] > 0.5


def test_benchmark_photographs_and_basicsr_windows():
    from benchmarks import input_pipeline as bench

    # BasicSR's extract_subimages.py on a DIV2K-sized image: every 240 pixels plus the border.
    assert bench.subimage_origins(1356) == [0, 240, 480, 720, 876]
    assert bench.subimage_origins(2040) == [0, 240, 480, 720, 960, 1200, 1440, 1560]
    assert bench.subimage_origins(960) == [0, 240, 480]
    photo = bench.large_photo(data.sample_photos(), np.random.default_rng(0))
    assert photo.shape == (1356, 2040, 3) and photo.dtype == np.uint8
    assert photo.shape[0] * photo.shape[1] >= 2_000_000
    # The mosaic covers the canvas: no row or column is left black.
    assert photo.max(axis=(1, 2)).min() > 10 and photo.max(axis=(0, 2)).min() > 10


def test_collate_matches_converting_crop_by_crop():
    rng = np.random.default_rng(1)
    crops = [
        {
            "gt": rng.integers(0, 256, (5, 6, 3), dtype=np.uint8),
            "noise": rng.standard_normal((5, 6, 3), dtype=np.float32) * np.float32(0.1),
        }
        for _ in range(3)
    ]
    batch = pipeline._collate(crops)
    gt = np.stack([c["gt"].astype(np.float32) / np.float32(255.0) for c in crops])
    np.testing.assert_array_equal(batch["gt"], gt)
    np.testing.assert_array_equal(batch["lq"], gt + np.stack([c["noise"] for c in crops]))
    assert batch["gt"].dtype == batch["lq"].dtype == np.float32
    paired = pipeline._collate([{"gt": c["gt"], "lq": 255 - c["gt"]} for c in crops])
    np.testing.assert_allclose(paired["lq"], 1.0 - gt, atol=1e-6)
