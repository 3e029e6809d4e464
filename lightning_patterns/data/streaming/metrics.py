"""Streaming metrics summed over the DataLoader workers of one rank.

Workers are separate processes, so their counters live in a small shared-memory array that the
dataset creates before the workers start (``multiprocessing`` frees it when the last process using
it exits, so nothing is left behind after a crash). Each worker adds to its own slot; the main process
reads the sum.
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

__all__ = ["METRIC_NAMES", "StreamCounters", "timed"]

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

    Pickling for a DataLoader worker started by ``spawn`` carries the shared array; any other pickling
    (a deepcopy, a checkpoint) carries a fresh, private set of zeros instead.
    """

    def __init__(self) -> None:
        self._values: Any = multiprocessing.RawArray("d", _SLOTS * len(METRIC_NAMES))

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self._values if get_spawning_popen() is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._values = (
            state["values"]
            if state["values"] is not None
            else multiprocessing.RawArray("d", _SLOTS * len(METRIC_NAMES))
        )

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
        """Every counter summed over the main process and all workers."""
        width = len(METRIC_NAMES)
        return {
            name: float(sum(self._values[slot * width + i] for slot in range(_SLOTS)))
            for i, name in enumerate(METRIC_NAMES)
        }

    def reset(self) -> None:
        """Zero every counter."""
        for i in range(len(self._values)):
            self._values[i] = 0.0


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
