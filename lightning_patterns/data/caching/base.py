"""The contract every epoch cache keeps, and small helpers the implementations share."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ClassVar

from lightning_patterns.data.shards.manifest import Manifest

__all__ = ["EpochCache", "ShardStream", "check_cache_limit"]

# ``stream(into, complete)``: starts fetching a shard into ``into`` (or memory of its own) and returns at once
# something that reads it while it arrives; resolves ``complete`` (see :meth:`EpochCache.get_or_stream`).
ShardStream = Callable[[memoryview | None, "Future[memoryview]"], Any]


def check_cache_limit(cache_limit: int | None) -> int | None:
    """Return ``cache_limit`` if it is ``None`` or a non-negative number of bytes, else raise ``ValueError``."""
    if cache_limit is None:
        return None
    if isinstance(cache_limit, bool) or not isinstance(cache_limit, int) or cache_limit < 0:
        raise ValueError(
            f"`cache_limit` must be a number of bytes >= 0 or None (as much as the dataset), got "
            f"cache_limit={cache_limit!r}. For example `cache_limit=20 * 2**30` for 20 GiB."
        )
    return cache_limit


class EpochCache(ABC):
    """Keeps verified shard bytes for later epochs.

    A dataset calls :meth:`bind` once in its constructor (in the main process, before any DataLoader
    worker starts), then :meth:`get_or_fetch` from any worker process and any of its threads.

    Subclasses declare their registry key as ``name`` and may override :meth:`from_options`, which
    :func:`~lightning_patterns.data.caching.make_cache` calls with the dataset's ``cache_dir`` and
    ``cache_limit``.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._counts_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_options(cls, *, cache_dir: str | None, cache_limit: int | None) -> EpochCache:
        """Build the cache from the dataset's ``cache_dir`` and ``cache_limit`` arguments."""
        raise NotImplementedError(f"{cls.__name__} cannot be built by name; pass an instance as `cache=`.")

    @abstractmethod
    def bind(self, manifest: Manifest) -> None:
        """Prepare for the dataset described by ``manifest`` (its content keys the entries)."""

    @abstractmethod
    def get_or_fetch(self, shard: int, fetch: Callable[[], bytes | memoryview]) -> Any:
        """The bytes of shard ``shard`` (index into ``manifest.shards``): cached, else ``fetch()``-ed and kept."""

    def get_or_fill(self, shard: int, fill: Callable[[memoryview | None], bytes | memoryview]) -> Any:
        """Like :meth:`get_or_fetch`, letting the cache offer the memory the shard is fetched into.

        ``fill(into)`` fetches the shard into ``into`` (writable, of the shard's size) and returns ``into``, or,
        given ``None``, fetches it into memory of its own and returns that. A cache that keeps shards in
        memory offers that memory, so keeping a shard costs no copy; a cache on disk may store it in the
        background, off the reader's path. This default offers nothing: ``get_or_fetch(shard, lambda:
        fill(None))``, so a cache that only implements :meth:`get_or_fetch` works unchanged.
        """
        return self.get_or_fetch(shard, lambda: fill(None))

    def get_or_stream(self, shard: int, stream: ShardStream) -> Any:
        """The cached bytes of ``shard``, or, on a miss, what ``stream`` returns: the shard read while it arrives.

        ``stream(into, complete)`` starts fetching the shard into ``into`` (as for :meth:`get_or_fill`) and returns
        at once (a reader of the arriving bytes). It resolves ``complete`` exactly once, also when it raises, and
        only after the last request that writes to the memory: to that memory, once every byte is verified, or to
        an error. The cache keeps the shard only then, so unverified bytes are never kept. This default waits for
        ``complete`` and keeps the shard through :meth:`get_or_fetch`: correct, but the caller gets the bytes only
        once all have arrived (a cache that can keep a shard later, like the memory and disk caches, overrides it).
        The caller tells a hit from a miss by the type it gets back.
        """

        def fetch() -> memoryview:
            complete: Future[memoryview] = Future()
            stream(None, complete)
            return complete.result()

        return self.get_or_fetch(shard, fetch)

    def flush(self) -> None:  # noqa: B027 - only caches that write in the background have something to wait for
        """Wait until every shard handed to the cache is stored (a disk cache writes in the background)."""

    def stats(self) -> tuple[int, int]:
        """``(hits, misses)`` counted in this process."""
        with self._counts_lock:
            return self._hits, self._misses

    def _count(self, *, hit: bool) -> None:
        with self._counts_lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def _reset_after_pickle(self) -> None:
        """Give an unpickled copy its own counters and lock (locks do not pickle)."""
        EpochCache.__init__(self)
