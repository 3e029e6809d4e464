"""Read-ahead that fills the link in order: range requests most urgent first, within a budget in bytes."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.remote import Deadline, RemoteReader
from lightning_patterns.data.shards import load_manifest, write_dataset
from lightning_patterns.data.streaming.fetcher import PriorityPool, ShardFetcher
from lightning_patterns.data.streaming.pipeline import ReadAheadPipeline
from lightning_patterns.testing.http_server import serve_directory


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _blocked(pool: PriorityPool, threads: int) -> threading.Event:
    """Occupy every thread of ``pool`` until the returned event is set, so that calls queue up meanwhile."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(10)

    for _ in range(threads):
        pool.submit((-1,), hold)
    for _ in range(threads):
        assert started.acquire(timeout=10)
    return release


def test_the_pool_runs_the_most_urgent_call_first_and_shutdown_cancels_the_rest() -> None:
    pool = PriorityPool(1)
    release = _blocked(pool, 1)
    ran: list[tuple[int, ...]] = []
    priorities = [(3,), (1,), (2, 1), (2, 0), (0,), (1,)]
    futures = [pool.submit(p, lambda p=p: ran.append(p)) for p in priorities]  # type: ignore[misc]
    assert pool.pending == len(priorities)
    release.set()
    for future in futures:
        future.result(timeout=10)
    assert ran == sorted(priorities)  # ties keep their order: (1,) then (1,)
    blocker = _blocked(pool, 1)
    late = pool.submit((0,), lambda: ran.append((9,)))
    pool.shutdown()
    blocker.set()
    assert late.cancelled()


def test_calls_cancelled_by_shutdown_wake_whoever_waits_for_them() -> None:
    # A loader waits for its chunks with concurrent.futures.wait: a call the pool cancels (queued at shutdown, or
    # submitted after it) must count as done there, or the loader's thread waits forever and the process cannot exit.
    pool = PriorityPool(1)
    release = _blocked(pool, 1)
    queued = pool.submit((0,), lambda: None)
    waiter_saw: list[int] = []
    waiter = threading.Thread(
        target=lambda: waiter_saw.append(len(concurrent.futures.wait([queued], timeout=10).not_done)), daemon=True
    )
    waiter.start()
    pool.shutdown()
    late = pool.submit((0,), lambda: None)
    waiter.join(timeout=10)
    release.set()
    assert waiter_saw == [0]
    assert queued.cancelled()
    assert late.cancelled()
    assert not concurrent.futures.wait([late], timeout=0).not_done


class _Loads:
    """A pipeline ``load`` that records which shards were requested, with which priority."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, shard: int, deadline: Deadline, priority: int) -> Any:
        with self._lock:
            self.calls.append((shard, priority))
        return f"shard {shard}"

    def shards(self) -> set[int]:
        with self._lock:
            return {shard for shard, _ in self.calls}


def _settled(loads: _Loads, expected: set[int]) -> None:
    _until(lambda: loads.shards() >= expected)
    time.sleep(0.1)  # and nothing more is requested
    assert loads.shards() == expected


def test_read_ahead_is_bounded_in_bytes_with_one_shard_ahead_always_allowed() -> None:
    loads = _Loads()
    schedule = [4, 0, 1, 2, 3]
    sizes = [10, 100, 10, 10, 10]  # shard 1 alone is over the budget
    pipeline = ReadAheadPipeline(
        schedule, sizes, loads, max_bytes=25, loaders=8, timeout=10, describe=str, on_close=lambda: None
    )
    try:
        # Shard 4 is in use; 0 and 1 would take 110 bytes: only 0 fits (20 with nothing else ahead is fine).
        _settled(loads, {4, 0})
        assert pipeline.get(4) == "shard 4"
        pipeline.release(4)  # now 0 is in use, and 1 goes ahead although it is larger than the budget
        _settled(loads, {4, 0, 1})
        pipeline.release(0)  # 1 in use: 2 and 3 fit in 25 bytes together (20)
        _settled(loads, {4, 0, 1, 2, 3})
        # Each shard's priority is its place in the schedule: the link goes to the one needed first.
        assert sorted(loads.calls) == sorted((shard, schedule.index(shard)) for shard in schedule)
    finally:
        pipeline.close()


def test_read_ahead_can_also_be_bounded_in_shards() -> None:
    loads = _Loads()
    pipeline = ReadAheadPipeline(
        list(range(6)), [1] * 6, loads, max_bytes=None, max_shards=2, loaders=8, timeout=10, describe=str
    )
    try:
        _settled(loads, {0, 1, 2})
        pipeline.release(0)
        _settled(loads, {0, 1, 2, 3})
    finally:
        pipeline.close()


@pytest.fixture
def served(tmp_path: Path) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    samples = [{"image": rng.integers(0, 256, size=(16, 16), dtype=np.uint8), "label": i} for i in range(1500)]
    folder = tmp_path / "data"
    write_dataset(samples, str(folder), shard_bytes=96 * 1024, block_bytes=4096, progress=False)
    with serve_directory(folder) as server:
        yield server, load_manifest(str(folder))


@pytest.mark.remote
@pytest.mark.parametrize("threads", [1, 3])
def test_the_shard_needed_first_gets_the_link_first(served: tuple[Any, Any], threads: int) -> None:
    server, manifest = served
    assert len(manifest.shards) >= 3
    reader = RemoteReader(server.url_for(""), chunk_size=16 * 1024)
    pool = PriorityPool(threads)
    fetcher = ShardFetcher(reader, manifest, pool, chunk_bytes=16 * 1024, verify=True)
    release = _blocked(pool, threads)
    results: dict[int, bytes] = {}
    order = [2, 0, 1]  # the schedule: shard 2 is needed first

    def load(shard: int) -> None:
        results[shard] = bytes(fetcher.fetch_whole(shard, None, order.index(shard), Deadline(30)))

    loaders = [threading.Thread(target=load, args=(shard,)) for shard in (1, 0, 2)]  # queued in another order
    for thread in loaders:
        thread.start()
    chunks = [-(-shard.num_bytes // (16 * 1024)) for shard in manifest.shards[:3]]
    _until(lambda: pool.pending >= sum(chunks) - 3)  # every load has queued its chunks (the heads' chunks merge)
    time.sleep(0.05)
    before = len(server.requests)
    release.set()
    for thread in loaders:
        thread.join(30)
    pool.shutdown()
    for shard in range(3):
        assert results[shard] == (Path(server.root) / manifest.shards[shard].path).read_bytes()
    paths = {f"/{manifest.shards[shard].path}": shard for shard in range(3)}
    served_order = [paths[r.path] for r in server.requests[before:] if r.path in paths]
    ranks = [order.index(shard) for shard in served_order]
    if threads == 1:
        assert ranks == sorted(ranks)  # all of shard 2, then all of 0, then all of 1
    else:
        # Every thread starts on the shard needed first; the next shard starts only when all of its chunks have.
        assert set(ranks[:threads]) == {0}
        assert ranks.index(1) >= chunks[2] - 1
