"""MemoryEpochCache beyond the cache contract (test_cache_contract.py): one region sized from the manifest, first-fit
under a limit, shared with spawned workers, anonymous, private to copies, bound to one dataset."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from lightning_patterns.data.caching import MemoryEpochCache
from lightning_patterns.testing.contracts import CountingSource, write_small_dataset


def test_the_region_holds_the_whole_dataset_without_a_limit(source: CountingSource) -> None:
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    for shard in range(len(source.manifest.shards)):
        assert bytes(cache.get_or_fetch(shard, source.fetcher(shard))) == source.expected(shard)
    assert cache.capacity == source.manifest.num_bytes
    assert cache.cached_shards() == list(range(len(source.manifest.shards)))


def test_limit_keeps_a_fixed_first_fit_subset(source: CountingSource) -> None:
    sizes = [shard.num_bytes for shard in source.manifest.shards]
    limit = sizes[0] + sizes[1] + sizes[-1]  # the last (smaller) shard fits after the others do not
    cache = MemoryEpochCache(limit)
    cache.bind(source.manifest)
    assert cache.cached_shards() == [0, 1, len(sizes) - 1]
    assert cache.capacity <= limit
    for _ in range(3):
        for shard in range(len(sizes)):
            assert bytes(cache.get_or_fetch(shard, source.fetcher(shard))) == source.expected(shard)
    # Epochs 2 and 3 fetch only what does not fit: at most dataset - limit + one shard.
    uncached = sum(sizes) - cache.capacity
    assert source.bytes == sum(sizes) + 2 * uncached
    assert uncached <= sum(sizes) - limit + max(sizes)


def _fill_in_child(cache: MemoryEpochCache, root: str, paths: list[str]) -> None:
    for shard, path in enumerate(paths):
        cache.get_or_fetch(shard, lambda path=path: Path(root, path).read_bytes())


@pytest.mark.slow
def test_spawned_workers_share_the_region(source: CountingSource) -> None:
    """A spawned worker (sent the memory file) fills the cache; the parent reads it without fetching: one copy.

    The contract checks the same with a forked worker, for every cache."""
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    process = multiprocessing.get_context("spawn").Process(
        target=_fill_in_child, args=(cache, str(source.root), [s.path for s in source.manifest.shards])
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0
    for shard in range(len(source.manifest.shards)):
        assert bytes(cache.get_or_fetch(shard, source.fetcher(shard))) == source.expected(shard)
    assert source.calls == []  # the parent fetched nothing: the child's fills are visible here
    assert cache.stats() == (len(source.manifest.shards), 0)


def test_region_is_anonymous(source: CountingSource) -> None:
    """The region has no name in any file system, so the kernel frees it with the last process using it."""
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    target = os.readlink(f"/proc/self/fd/{cache._fd}")
    assert target.startswith("/memfd:") or "(deleted)" in target


def test_copies_outside_spawn_get_a_private_region(source: CountingSource) -> None:
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    cache.get_or_fetch(0, source.fetcher(0))
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone.capacity == cache.capacity
        assert bytes(clone.get_or_fetch(0, source.fetcher(0))) == source.expected(0)
    assert source.calls == [0, 0, 0]


def test_binding_another_dataset_is_refused(source: CountingSource, tmp_path: Any) -> None:
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    cache.bind(source.manifest)  # the same dataset again: fine
    with pytest.raises(ValueError, match="already bound to another dataset"):
        cache.bind(write_small_dataset(tmp_path / "other", num_samples=50))


def test_reading_before_bind_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"before bind\(manifest\)"):
        MemoryEpochCache().get_or_fetch(0, lambda: b"")


def test_filling_reuses_the_region_the_shard_is_received_into(source: CountingSource) -> None:
    cache = MemoryEpochCache()
    cache.bind(source.manifest)
    offered: list[memoryview | None] = []

    def fill(into: memoryview | None) -> Any:
        offered.append(into)
        assert into is not None
        into[:] = source.expected(0)  # the fetch writes straight into the cache's region
        return into

    first = cache.get_or_fill(0, fill)
    into = offered[0]
    assert into is not None
    assert not into.readonly
    assert len(into) == source.manifest.shards[0].num_bytes
    assert bytes(first) == source.expected(0)
    # The hit is the very memory that was filled: no second copy was made.
    into[0] ^= 0xFF
    hit = cache.get_or_fill(0, lambda into: pytest.fail("a hit must not fetch"))
    assert memoryview(hit)[0] == into[0] != source.expected(0)[0]
    assert memoryview(hit).readonly
    # A fill that keeps its own memory is copied in once; a plugin's plain get_or_fetch works the same.
    second = cache.get_or_fill(1, lambda into: source.fetcher(1)())
    assert bytes(second) == source.expected(1)
    assert cache.stats() == (1, 2)
