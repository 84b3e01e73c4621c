"""A resumable stream of batches whose position does not depend on the number of workers.

`BatchStream(batches, worker_count)` wraps a `grain.MapDataset` in which batch `k` is a pure
function of `k`. Its iterator's state is `{"next_index": k}` (the format of grain's own
single-process iterator), so a run checkpointed with 2 workers resumes with 0 or 8. With workers,
batches `k, k+1, ...` come from grain's `mp_prefetch` over `batches[k:]`, each worker making
every `worker_count`-th batch; without, the calling thread makes batch `k` when asked.
"""

import collections

import grain

# Batches kept after they are handed out, so that stepping back over them (reading the first
# batch for TensorBoard samples, then rewinding) does not restart the worker processes.
_REPLAY = 2


class BatchStream:
    """An iterable of batches; every `iter()` starts at batch 0 (see module doc)."""

    def __init__(self, batches: grain.MapDataset, worker_count: int = 0):
        self.batches, self.worker_count = batches, int(worker_count)

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self.batches, self.worker_count)

    def __repr__(self) -> str:
        return f"BatchStream({self.batches}, worker_count={self.worker_count})"


class BatchIterator(grain.DatasetIterator):
    """Batches from `next_index` on; `get_state`/`set_state` are the position."""

    def __init__(self, batches: grain.MapDataset, worker_count: int):
        super().__init__()
        self._batches, self._workers = batches, worker_count
        self._position = 0
        self._workers_iter = None  # mp_prefetch iterator, started at the first batch needed
        self._recent = collections.deque(maxlen=_REPLAY)  # (position, batch) handed out
        self._replay = collections.deque()  # batches to hand out again after a rewind

    def __next__(self):
        self._assert_not_closed()
        position = self._position
        if self._replay:
            batch = self._replay.popleft()
        elif self._workers == 0:
            if position >= len(self._batches):
                raise StopIteration
            batch = self._batches[position]
        else:
            if self._workers_iter is None:
                parallel = self._batches[position:].to_iter_dataset(
                    grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
                )
                options = grain.MultiprocessingOptions(num_workers=self._workers)
                self._workers_iter = iter(parallel.mp_prefetch(options))
            batch = next(self._workers_iter)
        self._recent.append((position, batch))
        self._position = position + 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._position}

    def set_state(self, state: dict) -> None:
        try:
            position = int(state["next_index"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"Not a position of this input pipeline: {state!r} (expected "
                "{'next_index': <batches consumed>})."
            ) from e
        ahead = [batch for p, batch in self._recent if p >= position]
        handed_out = {p for p, _ in self._recent}
        if position <= self._position and all(
            p in handed_out for p in range(position, self._position)
        ):
            # A step back over recent batches: hand them out again, keep the workers running.
            self._replay.extendleft(reversed(ahead))
            self._recent = collections.deque(
                ((p, b) for p, b in self._recent if p < position), maxlen=_REPLAY
            )
        else:
            self._stop_workers()
        self._position = position

    def _stop_workers(self) -> None:
        self._replay.clear()
        self._recent.clear()
        if self._workers_iter is not None:
            self._workers_iter.close()
            self._workers_iter = None

    def close(self) -> None:
        """Stops the worker processes; the iterator cannot be used afterwards."""
        if not self._closed:
            self._stop_workers()
        super().close()

    def __str__(self) -> str:
        return f"BatchIterator(next_index={self._position}, worker_count={self._workers})"
