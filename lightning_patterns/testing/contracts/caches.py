"""The contract every epoch cache keeps, as a pytest base class parametrised over the ``CACHES`` registry.

Subclass :class:`EpochCacheContract` in a test module (the subclass's name must start with ``Test``) and every
cache registered in :data:`~lightning_patterns.data.caching.CACHES` (including those of other packages, through
the ``lightning_patterns.caches`` entry-point group) runs every test here::

    from lightning_patterns.testing.contracts import EpochCacheContract

    class TestEveryCache(EpochCacheContract):
        pass

A cache is built with its ``from_options(cache_dir=None, cache_limit=...)``, or, if it refuses that with a
``ValueError`` (it needs a folder), with a fresh folder of the test's ``tmp_path`` as ``cache_dir``; override
:meth:`EpochCacheContract.new_cache` for a cache built another way, and :meth:`EpochCacheContract.cache_names`
to run only some caches. The tests check behaviour only (bytes, fetch counts, hits and misses, read-only
results, locking), never how a cache stores its entries.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.caching import CACHES, EpochCache
from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.shards.manifest import Manifest, load_manifest

__all__ = ["CountingSource", "EpochCacheContract", "write_small_dataset"]

# How long a fetch waits for a second, concurrent fetch of the same shard before giving up: the window in
# which a cache without its lock is caught. A locked cache pays it once per shard, in parallel threads.
_OVERLAP_SECONDS = 0.3
# Bounds every wait on another thread or process, so that a cache that deadlocks fails instead of hanging.
_JOIN_SECONDS = 60.0


def write_small_dataset(root: Path, num_samples: int = 600, seed: int = 0) -> Manifest:
    """Write ``num_samples`` 8×8 images with labels as several ~8 KiB shards under ``root``; return the manifest."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(num_samples, 8, 8), dtype=np.uint8)
    samples = [{"image": images[i], "label": i} for i in range(num_samples)]
    write_dataset(samples, str(root), shard_bytes=8 * 1024, progress=False)
    return load_manifest(str(root))


class CountingSource:
    """Plays the remote for a cache: ``fetcher(i)`` returns a ``fetch()`` of shard ``i`` that counts what it reads.

    Args:
        root: The dataset's local folder.
        manifest: Its manifest.

    Attributes:
        calls: The shard of every fetch, in order.
        bytes: Bytes fetched in all.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.calls: list[int] = []
        self.bytes = 0
        self._lock = threading.Lock()

    def fetcher(self, shard: int) -> Callable[[], bytes]:
        """A ``fetch()`` for :meth:`EpochCache.get_or_fetch` that reads shard ``shard`` and counts it."""

        def fetch() -> bytes:
            data = (self.root / self.manifest.shards[shard].path).read_bytes()
            with self._lock:
                self.calls.append(shard)
                self.bytes += len(data)
            return data

        return fetch

    def expected(self, shard: int) -> bytes:
        """The bytes of shard ``shard``."""
        return (self.root / self.manifest.shards[shard].path).read_bytes()


def _read_all(cache: EpochCache, source: CountingSource) -> None:
    for shard in range(len(source.manifest.shards)):
        assert bytes(cache.get_or_fetch(shard, source.fetcher(shard))) == source.expected(shard)


def _fill_in_child(cache: EpochCache, root: str, paths: list[str]) -> None:
    for shard, path in enumerate(paths):
        cache.get_or_fetch(shard, Path(root, path).read_bytes)


def _hold_fill(cache: EpochCache, ready: Any) -> None:
    def never_returns() -> bytes:
        ready.set()
        time.sleep(600)
        return b""

    cache.get_or_fetch(0, never_returns)


class EpochCacheContract:
    """Tests every registered :class:`~lightning_patterns.data.caching.EpochCache` must pass (see the module)."""

    def cache_names(self) -> list[str]:
        """The caches to test: every registered one."""
        return CACHES.names()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each test once per cache of :meth:`cache_names` (read when tests are collected)."""
        if "cache_name" in metafunc.fixturenames:
            metafunc.parametrize("cache_name", self.cache_names())

    def new_cache(self, cache_name: str, folder: Path, cache_limit: int | None = None) -> EpochCache:
        """A new, unbound cache of ``cache_name`` keeping its entries (if any) in ``folder``.

        Two caches made with the same ``folder`` share what a cache shares between runs of one machine.
        """
        cls = CACHES.get(cache_name)
        try:
            return cls.from_options(cache_dir=None, cache_limit=cache_limit)
        except ValueError:  # it keeps its entries in a folder
            return cls.from_options(cache_dir=str(folder), cache_limit=cache_limit)
        except NotImplementedError:
            pytest.fail(
                f"The cache {cache_name!r} ({cls.__name__}) cannot be built by name: implement "
                f"{cls.__name__}.from_options, or override new_cache() in the contract's subclass."
            )

    @pytest.fixture
    def make_cache(self, cache_name: str, tmp_path: Path) -> Callable[..., EpochCache]:
        """``make_cache(cache_limit=None)``: a new cache of the one under test, all on this test's storage."""
        folder = tmp_path / "cache"
        return lambda cache_limit=None: self.new_cache(cache_name, folder, cache_limit)

    @pytest.fixture
    def source(self, tmp_path: Path) -> CountingSource:
        """A dataset of several shards on local disk, and the fetches that count reads of it."""
        root = tmp_path / "dataset"
        return CountingSource(root, write_small_dataset(root))

    def _bound(self, make_cache: Callable[..., EpochCache], source: CountingSource, **kwargs: Any) -> EpochCache:
        cache = make_cache(**kwargs)
        cache.bind(source.manifest)
        return cache

    # ------------------------------------------------------------------ the contract

    def test_declares_its_registry_name(self, cache_name: str) -> None:
        """The registry key is the class's declared ``name``."""
        cls = CACHES.get(cache_name)
        assert issubclass(cls, EpochCache)
        assert cls.name == cache_name

    def test_first_read_fetches_and_later_reads_hit(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """Epoch 1 fetches every shard once (misses); epoch 2 fetches nothing (hits), with the same bytes."""
        cache = self._bound(make_cache, source)
        n = len(source.manifest.shards)
        _read_all(cache, source)
        assert cache.stats() == (0, n)
        _read_all(cache, source)
        assert source.calls == list(range(n))
        assert cache.stats() == (n, n)

    def test_results_are_read_only(self, make_cache: Callable[..., EpochCache], source: CountingSource) -> None:
        """A training step that changes a batch in place must never change what the cache holds."""
        cache = self._bound(make_cache, source)
        first = cache.get_or_fetch(0, source.fetcher(0))
        again = cache.get_or_fetch(0, source.fetcher(0))
        assert memoryview(first).readonly
        assert memoryview(again).readonly
        assert bytes(again) == source.expected(0)

    def test_filling_into_offered_memory_reads_the_same_bytes(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """``get_or_fill``: a fill writes into the memory the cache offers (or its own); later reads hit, read-only."""
        cache = self._bound(make_cache, source)
        n = len(source.manifest.shards)
        offered: list[bool] = []

        def fill_for(shard: int) -> Callable[[memoryview | None], bytes | memoryview]:
            def fill(into: memoryview | None) -> bytes | memoryview:
                offered.append(into is not None)
                data = source.fetcher(shard)()
                if into is None:
                    return data
                assert not into.readonly, "the offered memory must be writable"
                assert len(into) == len(data), "the offered memory must have the shard's size"
                into[:] = data
                return into

            return fill

        for shard in range(n):
            assert bytes(cache.get_or_fill(shard, fill_for(shard))) == source.expected(shard)
        cache.flush()
        for shard in range(n):
            hit = cache.get_or_fill(shard, lambda into: pytest.fail("a cached shard must not be fetched again"))
            assert memoryview(hit).readonly
            assert bytes(hit) == source.expected(shard)
        assert source.calls == list(range(n))
        assert len(offered) == n
        assert cache.stats() == (n, n)

    def test_a_limit_bounds_what_later_epochs_fetch(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """Under ``cache_limit``, later epochs fetch at most ``dataset - limit + one shard``, and read right."""
        sizes = [shard.num_bytes for shard in source.manifest.shards]
        limit = sum(sizes) // 2
        cache = self._bound(make_cache, source, cache_limit=limit)
        for epoch in range(3):
            before = source.bytes
            _read_all(cache, source)
            if epoch:
                assert source.bytes - before <= sum(sizes) - limit + max(sizes)

    def test_a_zero_limit_caches_nothing(self, make_cache: Callable[..., EpochCache], source: CountingSource) -> None:
        """``cache_limit=0`` keeps nothing: every read fetches."""
        cache = self._bound(make_cache, source, cache_limit=0)
        assert bytes(cache.get_or_fetch(0, source.fetcher(0))) == source.expected(0)
        assert bytes(cache.get_or_fetch(0, source.fetcher(0))) == source.expected(0)
        assert source.calls == [0, 0]

    def test_concurrent_threads_fetch_each_shard_once(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """Threads asking for a shard while it is being fetched wait for that fetch instead of fetching again.

        Each fetch is slow on purpose: it waits until another fetch of the same shard starts (or
        ``_OVERLAP_SECONDS`` pass), so a cache without its per-shard lock is always caught fetching twice.
        """
        cache = self._bound(make_cache, source)
        shards, threads_per_shard = 3, 4
        fetching = dict.fromkeys(range(shards), 0)
        changed = threading.Condition()
        errors: list[BaseException] = []
        barrier = threading.Barrier(shards * threads_per_shard)

        def read(shard: int) -> None:
            fetch = source.fetcher(shard)

            def slow() -> bytes:
                with changed:
                    fetching[shard] += 1
                    changed.notify_all()
                    # Only a fetch the cache let through unlocked can start while this one waits.
                    changed.wait_for(lambda: fetching[shard] > 1, timeout=_OVERLAP_SECONDS)
                return fetch()

            try:
                barrier.wait(_JOIN_SECONDS)
                assert bytes(cache.get_or_fetch(shard, slow)) == source.expected(shard)
            except BaseException as err:  # reported below: an assert in a thread fails nothing by itself
                errors.append(err)

        threads = [
            threading.Thread(target=read, args=(i % shards,), daemon=True) for i in range(shards * threads_per_shard)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(_JOIN_SECONDS)
        assert not any(thread.is_alive() for thread in threads), "a reader was still waiting after a minute"
        assert not errors, errors[0]
        assert sorted(source.calls) == list(range(shards)), f"fetches per shard: {sorted(source.calls)}"

    def test_a_child_process_fills_the_cache_for_the_parent(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """DataLoader workers (forked here) fill the cache for each other: the parent then fetches nothing."""
        cache = self._bound(make_cache, source)
        paths = [shard.path for shard in source.manifest.shards]
        process = multiprocessing.get_context("fork").Process(
            target=_fill_in_child, args=(cache, str(source.root), paths)
        )
        process.start()
        process.join(_JOIN_SECONDS)
        assert process.exitcode == 0
        _read_all(cache, source)
        assert source.calls == []
        assert cache.stats() == (len(paths), 0)

    def test_a_killed_filler_does_not_block_others(
        self, make_cache: Callable[..., EpochCache], source: CountingSource
    ) -> None:
        """A worker killed while filling a shard leaves no lock behind: the next read fetches it at once."""
        cache = self._bound(make_cache, source)
        context = multiprocessing.get_context("fork")
        ready = context.Event()
        process = context.Process(target=_hold_fill, args=(cache, ready))
        process.start()
        assert ready.wait(_JOIN_SECONDS)
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(_JOIN_SECONDS)
        results: list[bytes] = []
        started = time.monotonic()
        reader = threading.Thread(
            target=lambda: results.append(bytes(cache.get_or_fetch(0, source.fetcher(0)))), daemon=True
        )
        reader.start()
        reader.join(_JOIN_SECONDS)
        assert results == [source.expected(0)], "the read after the killed fill did not finish"
        assert time.monotonic() - started < 5
        assert bytes(cache.get_or_fetch(0, source.fetcher(0))) == source.expected(0)
        assert source.calls == [0]

    def test_copies_read_the_same_bytes(self, make_cache: Callable[..., EpochCache], source: CountingSource) -> None:
        """Deep copies and pickled copies of a bound cache (a dataset sent elsewhere) read the right bytes."""
        cache = self._bound(make_cache, source)
        cache.get_or_fetch(0, source.fetcher(0))
        for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
            assert bytes(clone.get_or_fetch(0, source.fetcher(0))) == source.expected(0)
            assert bytes(clone.get_or_fetch(1, source.fetcher(1))) == source.expected(1)

    def test_a_changed_dataset_never_reads_stale_bytes(
        self, make_cache: Callable[..., EpochCache], source: CountingSource, tmp_path: Path
    ) -> None:
        """A cache on the same storage, bound to a rewritten dataset, serves nothing of the old one."""
        _read_all(self._bound(make_cache, source), source)
        changed_root = tmp_path / "changed"
        changed = CountingSource(changed_root, write_small_dataset(changed_root, seed=1))
        _read_all(self._bound(make_cache, changed), changed)
        assert changed.calls == list(range(len(changed.manifest.shards)))

    def test_reading_before_bind_is_an_error(self, make_cache: Callable[..., EpochCache]) -> None:
        """Reading before :meth:`EpochCache.bind` fails and says to bind first."""
        with pytest.raises(RuntimeError, match=r"before bind\(manifest\)"):
            make_cache().get_or_fetch(0, lambda: b"")
