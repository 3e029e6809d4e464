"""Read-ahead: keep the shards a worker will need next fetched, within a byte budget, and let go of old ones.

Network reads and checksums release the GIL, so background threads overlap downloads with the training
step even with ``num_workers=0``. Memory stays bounded: shards are requested ahead of the one in use only
while the bytes they take stay within ``max_bytes`` (and, if set, their number within ``max_shards``), and
a shard is dropped as soon as the last sample the worker needs from it has been yielded.

Each shard is loaded by its own coordinating call (``load``), which queues the shard's range requests on a
shared :class:`~lightning_patterns.data.streaming.fetcher.PriorityPool` with the shard's place in the
schedule as their priority: the link goes to the shard needed first, then to the ones after it.

Time is bounded too: each load gets a :class:`~lightning_patterns.data.remote.Deadline` of ``timeout``
seconds from its start, and all of them share one cancellation that :meth:`ReadAheadPipeline.close` sets.
When the consumer stops (its own wait timed out, an error, the epoch ended early), the downloads in flight
are cancelled and the threads finish, so the process can exit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from lightning_patterns.data.remote.deadline import Deadline
from lightning_patterns.data.shards.reader import ShardReader

__all__ = ["ReadAheadPipeline"]

log = logging.getLogger(__name__)

# A shard needed out of turn (not in the schedule) goes before every scheduled one.
_OUT_OF_TURN = -1


class ReadAheadPipeline:
    """Keeps the next shards of a schedule fetched, in order of first use, within a byte budget.

    Args:
        schedule: shard indices in the order the worker first needs them.
        load_bytes: per shard of the dataset, the bytes loading it takes (what counts against ``max_bytes``).
        load: fetches and opens one shard (called in a background thread) by the deadline it is given; its
            third argument is the shard's priority (lower is more urgent).
        max_bytes: bytes to request beyond the shard in use; ``None`` for no byte limit. One shard ahead is
            always allowed.
        max_shards: shards to request beyond the one in use; ``None`` for no limit.
        loaders: shards loaded at once (each load waits on its own range requests).
        timeout: seconds one load may take, and the consumer may wait for one shard, before failing.
        describe: names a shard (its URL) in error messages.
        on_close: called once by :meth:`close`, after the loads were cancelled.
    """

    def __init__(
        self,
        schedule: Sequence[int],
        load_bytes: Sequence[int],
        load: Callable[[int, Deadline, int], ShardReader],
        *,
        max_bytes: int | None,
        max_shards: int | None = None,
        loaders: int,
        timeout: float,
        describe: Callable[[int], str],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._schedule = list(schedule)
        self._position = {shard: at for at, shard in reversed(list(enumerate(self._schedule)))}
        self._load_bytes = load_bytes
        self._load = load
        self._max_bytes = max_bytes
        self._max_shards = max_shards
        self._timeout = timeout
        self._describe = describe
        self._on_close = on_close
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(loaders, 1), thread_name_prefix="lightning-patterns-read-load")
        self._futures: dict[int, Future[ShardReader]] = {}
        # Shards whose load finished, by shard: a batch asks for its shard, and this answers without a lock.
        self._opened: dict[int, ShardReader] = {}
        self._released: set[int] = set()
        self._next = 0
        self.wait_seconds = 0.0
        self._fill()

    def _in_use(self) -> int | None:
        """The admitted shard needed first (the one the consumer reads now, or waits for)."""
        return min(self._futures, key=lambda shard: self._position.get(shard, _OUT_OF_TURN), default=None)

    def _fill(self) -> None:
        while self._next < len(self._schedule):
            shard = self._schedule[self._next]
            if shard in self._futures or shard in self._released:
                # Already requested out of turn (a shuffle window reached it early), or done with.
                self._next += 1
                continue
            if self._futures and not self._may_admit(shard):
                break
            self._futures[shard] = self._pool.submit(self._run, shard, self._position[shard])
            self._next += 1

    def _may_admit(self, shard: int) -> bool:
        in_use = self._in_use()
        ahead = [s for s in self._futures if s != in_use]
        if self._max_shards is not None and len(ahead) >= self._max_shards:
            return False
        if self._max_bytes is None or not ahead:
            return True  # one shard ahead is always allowed, so one larger than the budget never stalls
        held = sum(self._load_bytes[s] for s in ahead)
        return held + self._load_bytes[shard] <= self._max_bytes

    def _run(self, shard: int, priority: int) -> ShardReader:
        # The deadline starts when the load does (not when it was queued), and close() cancels it.
        return self._load(shard, Deadline(self._timeout, cancelled=self._stopped), priority)

    def get(self, shard: int) -> ShardReader:
        """The opened shard, waiting for its fetch if needed."""
        opened = self._opened.get(shard)
        if opened is not None:
            return opened
        future = self._futures.get(shard)
        if future is None:
            # Needed earlier than scheduled (it cannot happen with a consistent schedule; be safe, not stuck).
            future = self._futures[shard] = self._pool.submit(self._run, shard, _OUT_OF_TURN)
        if not future.done():
            started = time.perf_counter()
            try:
                concurrent.futures.wait([future], timeout=self._timeout)
            finally:
                self.wait_seconds += time.perf_counter() - started
            if not future.done():  # (a fetch that failed on its own deadline raises its own error below)
                raise TimeoutError(
                    f"Fetching {self._describe(shard)} took longer than {self._timeout} s. Check the remote, or raise "
                    "`ReadAhead(timeout=...)` for very large shards on a slow link."
                )
        opened = self._opened[shard] = future.result()
        return opened

    def release(self, shard: int) -> None:
        """The worker needs nothing more from ``shard``: drop it and fetch further ahead."""
        future = self._futures.pop(shard, None)
        if future is not None:
            future.cancel()
        self._opened.pop(shard, None)
        self._released.add(shard)
        self._fill()

    def close(self) -> None:
        """Stop fetching: queued loads never start, and those in flight are cancelled at their next check."""
        self._stopped.set()
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._opened.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()
