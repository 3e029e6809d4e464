"""DiskEpochCache beyond the cache contract (test_cache_contract.py): atomic, verified, content-addressed, bounded
entries that only touch their own files, reused by a new run."""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lightning_patterns.data.caching import CacheEntryCorruptWarning, CacheLockTimeoutError, DiskEpochCache
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.caching.locks import file_lock
from lightning_patterns.testing.contracts import CountingSource, write_small_dataset


def _digest(source: CountingSource, shard: int) -> str:
    return source.manifest.shards[shard].checksum.removeprefix("sha256:")


def _entry(cache_dir: Path, source: CountingSource, shard: int) -> Path:
    return store_root(cache_dir) / "entries" / f"{_digest(source, shard)}.lps"


def _bound(cache_dir: Path, source: CountingSource, **kwargs: object) -> DiskEpochCache:
    cache = DiskEpochCache(cache_dir, min_free_bytes=0, **kwargs)  # type: ignore[arg-type]
    cache.bind(source.manifest)
    return cache


def _read_all(cache: DiskEpochCache, source: CountingSource) -> None:
    for shard in range(len(source.manifest.shards)):
        assert bytes(cache.get_or_fetch(shard, source.fetcher(shard))) == source.expected(shard)


def test_entries_are_named_by_checksum_and_reused_by_a_new_run(source: CountingSource, tmp_path: Path) -> None:
    cache = _bound(tmp_path / "c", source)
    _read_all(cache, source)
    n = len(source.manifest.shards)
    for shard in range(n):
        assert _entry(tmp_path / "c", source, shard).read_bytes() == source.expected(shard)
    assert cache.stats() == (0, n)
    fresh = _bound(tmp_path / "c", source)  # another run (or process) on the same folder
    _read_all(fresh, source)
    assert source.calls == list(range(n))
    assert fresh.stats() == (n, 0)


def test_hits_are_read_only_maps(source: CountingSource, tmp_path: Path) -> None:
    cache = _bound(tmp_path / "c", source)
    cache.get_or_fetch(0, source.fetcher(0))
    view = cache.get_or_fetch(0, source.fetcher(0))
    assert isinstance(view, memoryview)
    assert view.readonly
    assert bytes(view) == source.expected(0)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_entry_is_discarded_with_a_warning_and_fetched_again(
    source: CountingSource, tmp_path: Path, damage: str
) -> None:
    _read_all(_bound(tmp_path / "c", source), source)
    path = _entry(tmp_path / "c", source, 2)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    cache = _bound(tmp_path / "c", source)  # a new run: nothing verified yet
    source.calls.clear()
    with pytest.warns(CacheEntryCorruptWarning, match="corrupt or truncated") as caught:
        assert bytes(cache.get_or_fetch(2, source.fetcher(2))) == source.expected(2)
    assert _digest(source, 2) in str(caught[0].message)
    assert source.calls == [2]
    assert path.read_bytes() == source.expected(2)  # replaced by a good entry


def test_verification_is_shared_by_the_rank_and_done_once(source: CountingSource, tmp_path: Path) -> None:
    _read_all(_bound(tmp_path / "c", source), source)
    cache = _bound(tmp_path / "c", source)
    cache.get_or_fetch(0, source.fetcher(0))  # verifies
    path = _entry(tmp_path / "c", source, 0)
    st = path.stat()
    signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert cache._is_verified(0, signature)
    assert not cache._is_verified(1, signature)


def test_the_entries_on_disk_never_exceed_the_limit(source: CountingSource, tmp_path: Path) -> None:
    """What later epochs fetch under the limit is the contract's; the bytes the folder holds are this cache's."""
    limit = sum(shard.num_bytes for shard in source.manifest.shards) // 2
    cache = _bound(tmp_path / "c", source, cache_limit=limit)
    for _ in range(3):
        _read_all(cache, source)
        held = sum(p.stat().st_size for p in (store_root(tmp_path / "c") / "entries").iterdir())
        assert held <= limit


def test_eviction_removes_other_datasets_entries_least_recently_used_first(
    source: CountingSource, tmp_path: Path
) -> None:
    old_root = tmp_path / "old"
    old = CountingSource(old_root, write_small_dataset(old_root, seed=5))
    _read_all(_bound(tmp_path / "c", old), old)
    entries = store_root(tmp_path / "c") / "entries"
    foreign = [entries / "notes.txt", entries / ("0" * 64 + ".lps.bak"), store_root(tmp_path / "c") / "mine.lps"]
    for path in foreign:
        path.write_text("not the cache's")
    # Use old shard 0 last so it is the most recently used of the old dataset.
    time.sleep(0.01)
    _bound(tmp_path / "c", old).get_or_fetch(0, old.fetcher(0))
    limit = sum(s.num_bytes for s in old.manifest.shards)
    cache = _bound(tmp_path / "c", source, cache_limit=limit)
    cache.get_or_fetch(0, source.fetcher(0))  # needs room: the oldest old entries go first
    assert _entry(tmp_path / "c", source, 0).exists()
    assert _entry(tmp_path / "c", old, 0).exists()  # the most recently used stays
    assert not _entry(tmp_path / "c", old, 1).exists()
    for path in foreign:
        assert path.read_text() == "not the cache's"


def test_stale_temp_files_of_dead_writers_are_removed(source: CountingSource, tmp_path: Path) -> None:
    cache = _bound(tmp_path / "c", source)
    entries = store_root(tmp_path / "c") / "entries"
    stale = entries / f"{_digest(source, 3)}.lps.99999.deadbeef.tmp"
    stale.write_bytes(b"half")
    _read_all(cache, source)
    assert not stale.exists()


def test_low_free_space_stops_caching(source: CountingSource, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskEpochCache(tmp_path / "c", min_free_bytes=2**62)
    cache.bind(source.manifest)
    with caplog.at_level(logging.WARNING):
        _read_all(cache, source)
    assert not list((store_root(tmp_path / "c") / "entries").iterdir())
    assert "min_free_bytes" in caplog.text


def test_a_held_entry_lock_times_out_with_the_entry_named(source: CountingSource, tmp_path: Path) -> None:
    cache = _bound(tmp_path / "c", source, lock_timeout=0.2)
    lock = store_root(tmp_path / "c") / "locks" / f"{_digest(source, 1)}.lock"
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with file_lock(str(lock), timeout=5, what="test"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(CacheLockTimeoutError, match=f"disk cache entry {_digest(source, 1)[:16]}.*lock_timeout"):
            cache.get_or_fetch(1, source.fetcher(1))
    finally:
        release.set()
        thread.join()


def _read_in_child(cache: DiskEpochCache, root: str, paths: list[str]) -> None:
    for shard, path in enumerate(paths):
        cache.get_or_fetch(shard, lambda path=path: Path(root, path).read_bytes())


@pytest.mark.slow
def test_spawned_workers_share_verification(source: CountingSource, tmp_path: Path) -> None:
    _read_all(_bound(tmp_path / "c", source), source)
    cache = _bound(tmp_path / "c", source)
    paths = [s.path for s in source.manifest.shards]
    process = multiprocessing.get_context("spawn").Process(target=_read_in_child, args=(cache, str(source.root), paths))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert all(value != 0 for value in cache._verified[:])  # verified by the child, seen by the parent
    clone = pickle.loads(pickle.dumps(cache))  # not a spawn: private verification state
    assert all(value == 0 for value in clone._verified[:])


def test_entries_are_not_world_writable(source: CountingSource, tmp_path: Path) -> None:
    cache = _bound(tmp_path / "c", source)
    cache.get_or_fetch(0, source.fetcher(0))
    assert not os.stat(_entry(tmp_path / "c", source, 0)).st_mode & 0o002


def test_an_unwritable_cache_dir_is_explained(source: CountingSource, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError, match=r"cannot create its folder in cache_dir=.*Pass a writable local folder"):
        DiskEpochCache(blocker).bind(source.manifest)


def test_get_or_fill_stores_in_the_background_holding_the_entry_lock(source: CountingSource, tmp_path: Path) -> None:
    cache = DiskEpochCache(tmp_path / "cache", min_free_bytes=0)
    cache.bind(source.manifest)
    store, writing = cache._store, threading.Event()

    def slow_store(shard: int, data: Any) -> None:  # holds the background write until the test lets it go
        assert writing.wait(10)
        store(shard, data)

    cache._store = slow_store  # type: ignore[method-assign]
    fill_calls: list[int] = []

    def fill(into: memoryview | None) -> bytes:
        assert into is None  # a disk cache offers no memory
        fill_calls.append(0)
        return source.fetcher(0)()

    data = cache.get_or_fill(0, fill)  # returns before the entry is written
    assert bytes(data) == source.expected(0)
    entries = tmp_path / "cache" / "lightning_patterns_cache_v1" / "entries"
    assert not any(entries.glob("*.lps"))
    # A reader of this process gets the memory being written, at once (the next epoch never waits for the disk).
    again = cache.get_or_fill(0, fill)
    assert bytes(again) == source.expected(0)
    assert not any(entries.glob("*.lps"))
    # A reader of another process (another cache on the folder) waits for the entry instead of fetching it again.
    elsewhere = DiskEpochCache(tmp_path / "cache", min_free_bytes=0)
    elsewhere.bind(source.manifest)
    other: list[Any] = []
    waiter = threading.Thread(target=lambda: other.append(elsewhere.get_or_fill(0, fill)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    writing.set()
    waiter.join(10)
    cache.flush()
    assert bytes(other[0]) == source.expected(0)
    assert fill_calls == [0]
    assert cache.stats() == (1, 1)
    assert elsewhere.stats() == (1, 0)
    assert len(list(entries.glob("*.lps"))) == 1
    # Once written, this process reads the entry (a read-only map), no longer the memory it was written from.
    stored = cache.get_or_fill(0, fill)
    assert isinstance(stored, memoryview)
    assert isinstance(stored.obj, mmap.mmap)
    fresh = DiskEpochCache(tmp_path / "cache", min_free_bytes=0)
    fresh.bind(source.manifest)
    assert bytes(fresh.get_or_fill(0, lambda into: pytest.fail("the entry was stored"))) == source.expected(0)
