"""Streaming metrics summed over the DataLoader workers of one rank.

Workers are separate processes, so their counters live in a small shared-memory array that the
dataset creates before the workers start (``multiprocessing`` frees it when the last process using
it exits, so nothing is left behind after a crash). Each worker adds to its own slot; the main process
reads the sum. One figure is not a sum: ``first_batch_seconds``, the time from the start of the latest
iteration to its first batch, is the slowest slot's (with workers, a slot's time starts when its worker
starts iterating).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import get_spawning_popen
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from lightning_patterns.data.caching import EpochCache
    from lightning_patterns.data.remote import FetchStatsSnapshot

__all__ = ["METRIC_NAMES", "StreamCounters", "StreamRecorder", "timed"]

_T = TypeVar("_T")

METRIC_NAMES = (
    "samples",
    "remote_bytes",
    "remote_requests",
    "retries",
    "fetch_seconds",
    "read_wait_seconds",
    "cache_hits",
    "cache_misses",
)
_SLOTS = 65  # the main process plus up to 64 DataLoader workers


class StreamCounters:
    """Per-worker counters in shared memory; :meth:`totals` sums them.

    Pickling for a DataLoader worker started by ``spawn`` carries the shared arrays; any other pickling
    (a deepcopy, a checkpoint) carries a fresh, private set of zeros instead.
    """

    def __init__(self) -> None:
        self._values: Any = multiprocessing.RawArray("d", _SLOTS * len(METRIC_NAMES))
        self._first_batch: Any = multiprocessing.RawArray("d", _SLOTS)

    def __getstate__(self) -> dict[str, Any]:
        spawning = get_spawning_popen() is not None
        return {"values": self._values if spawning else None, "first_batch": self._first_batch if spawning else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._values = (
            state["values"]
            if state["values"] is not None
            else multiprocessing.RawArray("d", _SLOTS * len(METRIC_NAMES))
        )
        first = state.get("first_batch")
        self._first_batch = first if first is not None else multiprocessing.RawArray("d", _SLOTS)

    def set_first_batch(self, slot: int, seconds: float) -> None:
        """Record that the latest iteration of ``slot`` yielded its first batch ``seconds`` after it started."""
        self._first_batch[slot % _SLOTS] = max(seconds, 1e-9)

    def add(self, slot: int, **amounts: float) -> None:
        """Add to the counters of ``slot`` (``0`` for the main process, ``worker_id + 1`` for workers)."""
        base = (slot % _SLOTS) * len(METRIC_NAMES)
        for name, amount in amounts.items():
            self._values[base + METRIC_NAMES.index(name)] += amount

    def add_fetches(self, slot: int, delta: FetchStatsSnapshot, **amounts: float) -> None:
        """Add what the remote reads between two snapshots did (bytes, requests, retries, seconds), and ``amounts``."""
        self.add(
            slot,
            remote_bytes=delta.bytes_read,
            remote_requests=delta.requests,
            retries=delta.retries,
            fetch_seconds=delta.seconds,
            **amounts,
        )

    def add_cache(self, slot: int, cache: EpochCache | None, seen: tuple[int, int]) -> tuple[int, int]:
        """Add the hits and misses of ``cache`` since ``seen`` (an earlier ``stats()``); returns ``stats()`` now."""
        if cache is None:
            return seen
        hits, misses = cache.stats()
        self.add(slot, cache_hits=hits - seen[0], cache_misses=misses - seen[1])
        return hits, misses

    def totals(self) -> dict[str, float]:
        """Every counter summed over the main process and all workers, and ``first_batch_seconds``.

        ``first_batch_seconds`` is the slowest slot's time to its first batch in its latest iteration (``0.0``
        before any batch).
        """
        width = len(METRIC_NAMES)
        totals = {
            name: float(sum(self._values[slot * width + i] for slot in range(_SLOTS)))
            for i, name in enumerate(METRIC_NAMES)
        }
        totals["first_batch_seconds"] = float(max(self._first_batch))
        return totals

    def reset(self) -> None:
        """Zero every counter."""
        for i in range(len(self._values)):
            self._values[i] = 0.0
        for i in range(len(self._first_batch)):
            self._first_batch[i] = 0.0


class StreamRecorder:
    """What one iteration adds to its slot of :class:`StreamCounters`, written in bursts rather than per batch.

    Per batch it only adds to a local count; every ``every`` seconds (and at :meth:`flush`) it writes the samples,
    the fetch counters' growth, the time waited for shards and the cache's hits and misses to the shared slot.
    A cached epoch yields tens of thousands of batches a second, so shared-memory writes per batch would cost
    more than slicing the batch.

    Args:
        counters: the shared counters.
        slot: this iteration's slot (``0``: the main process; ``worker_id + 1``: a DataLoader worker).
        fetched: returns the fetch counters (``bytes_read``, ``requests``, ``retries``, ``seconds``) so far.
        waited: returns the seconds waited for shards since the iteration began.
        cache_stats: returns the cache's ``(hits, misses)`` so far, or ``None`` without a cache.
        every: seconds between writes.
    """

    def __init__(
        self,
        counters: StreamCounters,
        slot: int,
        fetched: Callable[[], Any],
        waited: Callable[[], float],
        cache_stats: Callable[[], tuple[int, int]] | None,
        every: float = 0.1,
    ) -> None:
        self._counters = counters
        self._slot = slot
        self._fetched_now = fetched
        self._waited_now = waited
        self._cache_now = cache_stats
        self._every = every
        self._fetched = fetched()
        self._waited = 0.0  # waits are counted from the start of the iteration
        self._cache = cache_stats() if cache_stats is not None else (0, 0)
        self._samples = 0
        self._due = time.perf_counter() + every

    def add(self, samples: int) -> None:
        """``samples`` more were yielded."""
        self._samples += samples
        if time.perf_counter() >= self._due:
            self.flush()

    def flush(self) -> None:
        """Write what was counted since the last write."""
        now = self._fetched_now()
        delta = now - self._fetched
        waited = self._waited_now()
        amounts = {
            "samples": self._samples,
            "remote_bytes": delta.bytes_read,
            "remote_requests": delta.requests,
            "retries": delta.retries,
            "fetch_seconds": delta.seconds,
            "read_wait_seconds": waited - self._waited,
        }
        if self._cache_now is not None:
            hits, misses = self._cache_now()
            amounts.update(cache_hits=hits - self._cache[0], cache_misses=misses - self._cache[1])
            self._cache = (hits, misses)
        self._counters.add(self._slot, **amounts)
        self._fetched, self._waited, self._samples = now, waited, 0
        self._due = time.perf_counter() + self._every


def timed(items: Iterator[_T], add_wait: Callable[[float], None]) -> Iterator[_T]:
    """Yield ``items``, telling ``add_wait`` how many seconds each one took to arrive (the time waited for data)."""
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            add_wait(time.perf_counter() - started)
        yield item
