"""``MemoryEpochCache``: shards in one anonymous shared-memory region per rank, shared by its DataLoader workers.

:meth:`MemoryEpochCache.bind` runs in the main process before any worker starts. It lays the shards out at
fixed offsets (their sizes are in the manifest) in a region of ``min(dataset bytes, cache_limit)``, backed
by an anonymous memory file (``os.memfd_create``; an unlinked temp file elsewhere). Forked workers inherit
the mapping, and workers started with ``spawn`` or ``forkserver`` receive the file descriptor when the
dataset is sent to them, so every process of the rank reads the same pages: no worker holds its own copy.
The memory file has no name, so the kernel frees it when the last process using it exits, whatever the
way it exits: nothing is left behind after a crash or ``kill -9``.

Shards that do not fit under the limit (first fit, in manifest order) are not cached, so each epoch reads
at most ``dataset - cache_limit + one shard`` from the remote. Without a ``cache_limit`` the limit is the
dataset, but never more than :data:`MEMORY_FRACTION` of the machine's physical memory: the region is sized
from the sizes the manifest declares, so a manifest that declares huge shards must not reserve a region
beyond the machine, and a single shard larger than that limit is refused at :meth:`MemoryEpochCache.bind`
with an error naming it. A shard is filled once: per-shard record
locks (``fcntl.lockf`` on the memory file, which die with their process) make concurrent readers wait for
the one filling it, and a ready flag in a shared array marks it complete.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from multiprocessing.context import get_spawning_popen
from multiprocessing.reduction import DupFd
from typing import Any, ClassVar

from lightning_patterns.data.caching.base import EpochCache, ShardStream, check_cache_limit
from lightning_patterns.data.shards.manifest import Manifest

__all__ = ["MEMORY_FRACTION", "MemoryEpochCache"]

log = logging.getLogger(__name__)

_READY = 1
# The share of physical memory a memory cache without `cache_limit` may take.
MEMORY_FRACTION = 0.8


def _anonymous_file(size: int) -> int:
    """A descriptor of a nameless, ``size``-byte file in memory."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lightning_patterns_cache", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS: an unlinked temp file (in tmpfs where there is one)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, path = tempfile.mkstemp(prefix="lightning_patterns_cache_", dir=folder)
        os.unlink(path)
        fd = handle
    os.ftruncate(fd, size)
    return fd


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without these names
        return 0


class MemoryEpochCache(EpochCache):
    """Keeps shards in shared memory: one copy per rank, read by all its DataLoader workers.

    Batches decoded from cached shards are copies (the region is mapped read-only for them), so a training
    step that changes a batch in place never changes the cache.

    Args:
        cache_limit: bytes of shards to keep; ``None`` keeps the whole dataset. Pages are only allocated as
            shards are filled.
        fill_timeout: seconds to wait for another worker filling a shard before fetching it directly.

    Raises:
        ValueError: an argument is out of range.
    """

    name: ClassVar[str] = "memory"

    def __init__(self, cache_limit: int | None = None, *, fill_timeout: float = 600.0) -> None:
        super().__init__()
        self.cache_limit = check_cache_limit(cache_limit)
        if not fill_timeout > 0:
            raise ValueError(f"`fill_timeout` must be a positive number of seconds, got fill_timeout={fill_timeout!r}.")
        self.fill_timeout = float(fill_timeout)
        self._manifest: Manifest | None = None
        self._offsets: list[int] = []
        self._capacity = 0
        self._fd = -1
        self._region: mmap.mmap | None = None
        self._ready: Any = None
        self._init_process_state()

    @classmethod
    def from_options(cls, *, cache_dir: str | None, cache_limit: int | None) -> MemoryEpochCache:
        """Build the cache from the dataset's ``cache_limit`` (``cache_dir`` must be ``None``)."""
        if cache_dir is not None:
            raise ValueError(
                f"cache='memory' keeps shards in memory and takes no folder, but cache_dir={cache_dir!r} was given. "
                "Use cache='disk' to keep shards in that folder, or drop `cache_dir`."
            )
        return cls(cache_limit)

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._thread_locks: dict[int, threading.Lock] = {}

    @property
    def capacity(self) -> int:
        """Bytes of the shared region (the shards that fit under the limit)."""
        return self._capacity

    def cached_shards(self) -> list[int]:
        """Indices of the shards the region has room for."""
        return [shard for shard, offset in enumerate(self._offsets) if offset >= 0]

    def bind(self, manifest: Manifest) -> None:
        """Lay the shards out and create the shared region (call before DataLoader workers start).

        Raises:
            ValueError: the cache is already bound to another dataset, or (without ``cache_limit``) a shard is
                larger than :data:`MEMORY_FRACTION` of this machine's memory.
        """
        if self._manifest is not None:
            if self._manifest == manifest:
                return
            raise ValueError(
                "This MemoryEpochCache is already bound to another dataset. Give every StreamingDataset its own "
                "cache, e.g. `cache='memory'` or a new `MemoryEpochCache()`."
            )
        limit = self._effective_limit(manifest)
        offsets, used = [], 0
        for shard in manifest.shards:
            if used + shard.num_bytes <= limit:
                offsets.append(used)
                used += shard.num_bytes
            else:
                offsets.append(-1)
        self._manifest, self._offsets, self._capacity = manifest, offsets, used
        physical = _physical_memory()
        if physical and used > MEMORY_FRACTION * physical:
            log.warning(
                "The memory cache may hold %s bytes, over %d%% of this machine's %s bytes of memory; set "
                "`cache_limit` lower, or use cache='disk'.",
                used,
                round(100 * MEMORY_FRACTION),
                physical,
            )
        self._fd = _anonymous_file(used)
        self._region = mmap.mmap(self._fd, used) if used else None
        self._ready = multiprocessing.RawArray("b", len(offsets))
        log.debug("Memory cache: %s of %s shards fit in %s bytes", len(self.cached_shards()), len(offsets), used)

    def _effective_limit(self, manifest: Manifest) -> int:
        """The region's limit: ``cache_limit``, else the dataset capped at a share of physical memory."""
        if self.cache_limit is not None:
            return self.cache_limit
        physical = _physical_memory()
        if not physical or manifest.num_bytes <= MEMORY_FRACTION * physical:
            return manifest.num_bytes
        limit = int(MEMORY_FRACTION * physical)
        for shard in manifest.shards:
            if shard.num_bytes > limit:
                raise ValueError(
                    f"The memory cache cannot hold shard {shard.path!r}: its manifest entry declares "
                    f"{shard.num_bytes} bytes, more than the cache's limit of {limit} bytes "
                    f"({round(100 * MEMORY_FRACTION)}% of this machine's {physical} bytes of memory, as "
                    "cache_limit=None). A shard that large cannot be read into memory at all: check the manifest "
                    "(it may be corrupt or hostile), rewrite the dataset with smaller shards (`shard_bytes`), or "
                    "use cache='disk'."
                )
        log.warning(
            "The dataset declares %s bytes, more than %d%% of this machine's %s bytes of memory: the memory cache "
            "keeps the shards that fit in %s bytes and reads the others every epoch. Set `cache_limit`, or use "
            "cache='disk'.",
            manifest.num_bytes,
            round(100 * MEMORY_FRACTION),
            physical,
            limit,
        )
        return limit

    def __getstate__(self) -> dict[str, Any]:
        state = {
            name: value
            for name, value in self.__dict__.items()
            if name not in ("_region", "_guard", "_thread_locks", "_counts_lock", "_fd", "_ready")
        }
        if get_spawning_popen() is not None and self._manifest is not None:
            # A worker started by spawn/forkserver: send the memory file itself, so it shares the region.
            state["_shared"] = (DupFd(self._fd), self._ready)
        else:
            state["_shared"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        shared = state.pop("_shared")
        manifest = state.pop("_manifest")
        self.__dict__.update(state)
        self._reset_after_pickle()
        self._init_process_state()
        self._manifest = None
        self._fd, self._region, self._ready = -1, None, None
        if shared is not None:
            self._manifest = manifest
            self._fd = shared[0].detach()
            self._region = mmap.mmap(self._fd, self._capacity) if self._capacity else None
            self._ready = shared[1]
        elif manifest is not None:
            self.bind(manifest)  # any other copy (deepcopy, pickle to disk) gets a fresh, private region

    def _view(self, shard: int) -> memoryview:
        assert self._region is not None
        assert self._manifest is not None
        offset = self._offsets[shard]
        return memoryview(self._region)[offset : offset + self._manifest.shards[shard].num_bytes].toreadonly()

    def get_or_fetch(self, shard: int, fetch: Callable[[], bytes | memoryview]) -> Any:
        """The shard from the shared region; on the first read ``fetch()`` it, once per rank, and keep it.

        Raises:
            RuntimeError: :meth:`bind` was not called.
        """
        return self.get_or_fill(shard, lambda into: fetch())

    def get_or_fill(self, shard: int, fill: Callable[[memoryview | None], bytes | memoryview]) -> Any:
        """The shard from the shared region; on the first read ``fill`` the region itself with it, once per rank.

        The shard is fetched straight into its place in the shared region (``fill(into)``), so keeping it
        costs no copy; it is marked ready, for every worker of the rank, only once ``fill`` returned (the
        bytes verified). A ``fill`` that returns other memory is copied in.

        Raises:
            RuntimeError: :meth:`bind` was not called.
        """
        if self._manifest is None:
            raise RuntimeError(
                "MemoryEpochCache.get_or_fetch() before bind(manifest): bind the cache to a dataset first."
            )
        if self._offsets[shard] < 0:
            self._count(hit=False)
            return fill(None)
        if self._ready[shard] == _READY:
            self._count(hit=True)
            return self._view(shard)
        with self._filling(shard) as owner:
            if self._ready[shard] == _READY:
                self._count(hit=True)
                return self._view(shard)
            if not owner:
                self._count(hit=False)
                return fill(None)
            assert self._region is not None
            offset, size = self._offsets[shard], self._manifest.shards[shard].num_bytes
            target = memoryview(self._region)[offset : offset + size]
            data = fill(target)
            self._count(hit=False)
            if data is not target:
                if len(data) != size:
                    return data
                target[:] = data
            self._ready[shard] = _READY
        return self._view(shard)

    def get_or_stream(self, shard: int, stream: ShardStream) -> Any:
        """The shard from the shared region; on the first read it is read while it arrives into the region itself.

        The right to fill the shard is held until ``stream`` resolves its ``complete`` future (from whichever
        thread lands the last piece); the shard is marked ready, for every worker of the rank, only if it
        resolved to the whole verified shard. Until then readers of this stream read the region as blocks land
        and are verified; other workers wait for the fill, as with :meth:`get_or_fill`.

        Raises:
            RuntimeError: :meth:`bind` was not called.
        """
        if self._manifest is None:
            raise RuntimeError(
                "MemoryEpochCache.get_or_stream() before bind(manifest): bind the cache to a dataset first."
            )
        if self._offsets[shard] < 0:
            self._count(hit=False)
            return stream(None, Future())
        if self._ready[shard] == _READY:
            self._count(hit=True)
            return self._view(shard)
        if not self._acquire_fill(shard):
            self._count(hit=False)
            return stream(None, Future())
        if self._ready[shard] == _READY:
            self._release_fill(shard)
            self._count(hit=True)
            return self._view(shard)
        assert self._region is not None
        offset, size = self._offsets[shard], self._manifest.shards[shard].num_bytes
        complete: Future[memoryview] = Future()

        def finished(done: Future[memoryview]) -> None:
            try:
                if not done.cancelled() and done.exception() is None:
                    self._ready[shard] = _READY
            finally:
                self._release_fill(shard)

        complete.add_done_callback(finished)
        self._count(hit=False)
        return stream(memoryview(self._region)[offset : offset + size], complete)

    @contextmanager
    def _filling(self, shard: int) -> Iterator[bool]:
        """Hold the right to fill ``shard`` (yields ``False`` if it could not be had in ``fill_timeout``)."""
        owner = self._acquire_fill(shard)
        try:
            yield owner
        finally:
            if owner:
                self._release_fill(shard)

    def _acquire_fill(self, shard: int) -> bool:
        """Take the right to fill ``shard``, waiting up to ``fill_timeout`` (``False`` if it could not be had).

        Release it with :meth:`_release_fill`, from any thread of this process.
        """
        if os.getpid() != self._pid:  # forked: locks held by the parent's threads mean nothing here
            self._init_process_state()
        with self._guard:
            thread_lock = self._thread_locks.setdefault(shard, threading.Lock())
        deadline = time.monotonic() + self.fill_timeout
        if not thread_lock.acquire(timeout=self.fill_timeout):
            return False
        # Record locks are per process, so the thread lock above orders this process's threads first.
        delay = 0.0005
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, shard)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    log.warning(
                        "Waited %s s for another worker to fill shard %s; fetching it directly",
                        self.fill_timeout,
                        shard,
                    )
                    thread_lock.release()
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def _release_fill(self, shard: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, shard)
        self._thread_locks[shard].release()

    def __repr__(self) -> str:
        return f"MemoryEpochCache(cache_limit={self.cache_limit!r}, capacity={self._capacity})"
