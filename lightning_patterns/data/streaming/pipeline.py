"""Read-ahead: fetch the shards a worker will need next in background threads, and let go of old ones.

Network reads and checksums release the GIL, so a small thread pool overlaps downloads with the
training step even with ``num_workers=0``. Memory stays bounded: at most ``read_ahead`` shards (and
``read_ahead_bytes``) are requested beyond those in use, and a shard is dropped as soon as the last
sample the worker needs from it has been yielded.

Time is bounded too: each fetch gets a :class:`~lightning_patterns.data.remote.Deadline` of ``timeout``
seconds from its start, and all of them share one cancellation that :meth:`ReadAhead.close` sets. When the
consumer stops (its own wait timed out, an error, the epoch ended early), the downloads in flight are
cancelled and the threads finish, so the process can exit.
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


class ReadAheadPipeline:
    """Keeps the next shards of a schedule fetched, in order of first use.

    Args:
        schedule: shard indices in the order the worker first needs them.
        shard_bytes: size of every shard of the dataset, to bound bytes in flight.
        load: fetches and decodes one shard (called in a background thread) by the deadline it is given.
        read_ahead: shards to request beyond the one in use.
        read_ahead_bytes: bytes to request beyond the shard in use; ``None`` for no byte limit.
        threads: background threads.
        timeout: seconds one fetch may take, and the consumer may wait for one shard, before failing.
        describe: names a shard (its URL) in error messages.
    """

    def __init__(
        self,
        schedule: Sequence[int],
        shard_bytes: Sequence[int],
        load: Callable[[int, Deadline], ShardReader],
        *,
        read_ahead: int,
        read_ahead_bytes: int | None,
        threads: int,
        timeout: float,
        describe: Callable[[int], str],
    ) -> None:
        self._schedule = list(schedule)
        self._shard_bytes = shard_bytes
        self._load = load
        self._read_ahead = read_ahead
        self._read_ahead_bytes = read_ahead_bytes
        self._timeout = timeout
        self._describe = describe
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lightning-patterns-read")
        self._futures: dict[int, Future[ShardReader]] = {}
        self._released: set[int] = set()
        self._next = 0
        self.wait_seconds = 0.0
        self._fill()

    def _bytes_ahead(self) -> int:
        return sum(self._shard_bytes[shard] for shard in self._futures)

    def _fill(self) -> None:
        while self._next < len(self._schedule):
            in_flight = len(self._futures)
            # Always allow one shard beyond the first, else a single large shard would stall the pipeline.
            if in_flight > self._read_ahead:
                break
            shard = self._schedule[self._next]
            if shard in self._futures or shard in self._released:
                # Already requested out of turn (a shuffle window reached it early), or done with.
                self._next += 1
                continue
            if (
                self._read_ahead_bytes is not None
                and in_flight > 1
                and self._bytes_ahead() + self._shard_bytes[shard] > self._read_ahead_bytes
            ):
                break
            self._futures[shard] = self._pool.submit(self._run, shard)
            self._next += 1

    def _run(self, shard: int) -> ShardReader:
        # The deadline starts when the fetch does (not when it was queued), and close() cancels it.
        return self._load(shard, Deadline(self._timeout, cancelled=self._stopped))

    def get(self, shard: int) -> ShardReader:
        """The decoded shard, waiting for its fetch if needed."""
        future = self._futures.get(shard)
        if future is None:
            # Needed earlier than scheduled (it cannot happen with a consistent schedule; be safe, not stuck).
            future = self._futures[shard] = self._pool.submit(self._run, shard)
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
        return future.result()

    def release(self, shard: int) -> None:
        """The worker needs nothing more from ``shard``: drop it and fetch further ahead."""
        future = self._futures.pop(shard, None)
        if future is not None:
            future.cancel()
        self._released.add(shard)
        self._fill()

    def close(self) -> None:
        """Stop fetching: queued fetches never start, and those in flight are cancelled at their next check."""
        self._stopped.set()
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
