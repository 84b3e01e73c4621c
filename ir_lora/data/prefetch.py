"""Loading the next batches (and putting them on the devices) while the current step runs.

`Prefetcher(iterator, transform=...)` reads `iterator` in a background thread, applies
`transform` there (e.g. `sharding.make_global_batch`, which copies the batch to the devices),
and keeps up to `buffer_size` results ready. Its `get_state()` is the wrapped iterator's state
after the last batch handed out, not after the ones read ahead, so a checkpoint resumes at the
first batch the training loop has not seen; `set_state()` drops what was read ahead.

It also measures how long `next()` blocks: `take_wait_fraction()` is the share of wall time
since its previous call that the consumer spent waiting for data (an upper bound on the time an
accelerator sits idle for want of input).
"""

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Iterator):
    """Background-thread prefetch of an iterator with exact `get_state`/`set_state`."""

    def __init__(
        self,
        iterator: Iterator,
        *,
        transform: Callable[[Any], Any] | None = None,
        buffer_size: int = 2,
        max_items: int | None = None,
    ):
        """
        Args:
          iterator: the source; `get_state`/`set_state` are used if it has them. Only the
            background thread touches it while it runs.
          transform: applied to each element in the background thread.
          buffer_size: elements read ahead (>= 1).
          max_items: hand out at most this many elements (e.g. the steps left to train) and
            read no more, so that a consumer that takes them all leaves `iterator` exactly
            where it stopped.
        """
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self._source, self._transform = iterator, transform
        self._buffer_size = buffer_size
        self._max_items, self._handed_out = max_items, 0
        self._left = max_items  # elements the background thread may still read
        self._state = self._source_state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._waited = 0.0
        self._interval_start: float | None = None
        self._interval_waited = 0.0

    def _source_state(self):
        get_state = getattr(self._source, "get_state", None)
        return None if get_state is None else copy.deepcopy(get_state())

    def _run(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self._left is not None and self._left <= 0:
                    raise StopIteration
                item = next(self._source)
                if self._left is not None:
                    self._left -= 1
                state = self._source_state()
                if self._transform is not None:
                    item = self._transform(item)
                entry = (item, state)
            except BaseException as e:  # StopIteration included: handed to the consumer.
                entry = _Failure(e)
            while not stop.is_set():
                try:
                    out.put(entry, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(entry, _Failure):
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._buffer_size)
        self._thread = threading.Thread(
            target=self._run, args=(self._queue, self._stop), name="prefetch", daemon=True
        )
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        start = time.perf_counter()
        if self._interval_start is None:
            self._interval_start = start
        entry = self._queue.get()
        waited = time.perf_counter() - start
        self._waited += waited
        self._interval_waited += waited
        if isinstance(entry, _Failure):
            self._halt()
            raise entry.error
        item, self._state = entry
        self._handed_out += 1
        return item

    @property
    def wait_seconds(self) -> float:
        """Total time `next()` has blocked."""
        return self._waited

    def take_wait_fraction(self) -> float:
        """Share of wall time that `next()` blocked since the previous call (or the first
        `next()`), in [0, 1]; starts a new interval."""
        now = time.perf_counter()
        if self._interval_start is None:
            return 0.0
        elapsed = now - self._interval_start
        fraction = self._interval_waited / elapsed if elapsed > 0 else 0.0
        self._interval_start, self._interval_waited = now, 0.0
        return min(1.0, fraction)

    def get_state(self):
        """The wrapped iterator's state after the last element handed out."""
        return copy.deepcopy(self._state)

    def set_state(self, state) -> None:
        """Drops what was read ahead and moves the wrapped iterator to `state`."""
        self._halt()
        if self._max_items is not None:  # What was read ahead was never handed out.
            self._left = self._max_items - self._handed_out
        self._source.set_state(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stops the background thread (the wrapped iterator stays open)."""
        self._halt()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
