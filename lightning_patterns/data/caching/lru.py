"""The disk cache's admission and eviction policy, as a pure function (so property tests can check it).

Least-recently-used eviction with one twist: entries of the dataset being read are never evicted to make
room for another shard of that same dataset. Each epoch reads every shard once, in a cycle, and plain LRU
on a cycle larger than the cache evicts every entry just before it is needed again (a hit rate of zero).
Keeping a fixed subset instead bounds what each epoch reads from the remote by
``dataset - cache_limit + one shard``. Entries of other datasets (older manifests, other splits) are
evicted least recently used first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Admission", "CacheEntry", "plan_admission"]


@dataclass(frozen=True)
class CacheEntry:
    """One complete entry of the cache, as the policy sees it.

    Args:
        name: the entry's file name.
        num_bytes: its size.
        last_used: when it was last read or written (any monotonic clock, e.g. ``st_atime_ns``).
        protected: it belongs to the dataset being read, so it is never evicted for that dataset's shards.
    """

    name: str
    num_bytes: int
    last_used: int
    protected: bool = False


@dataclass(frozen=True)
class Admission:
    """What to do with an incoming entry.

    Args:
        admit: store the incoming entry.
        evict: names of the entries to delete first (empty unless ``admit``).
        reason: ``"fits"``, ``"evicted"``, ``"too_large"`` (larger than the limit), ``"full"`` (only
            protected entries left to evict) or ``"low_disk"`` (the free-space watermark would be crossed).
    """

    admit: bool
    evict: tuple[str, ...]
    reason: str


def plan_admission(
    entries: Iterable[CacheEntry],
    incoming_bytes: int,
    *,
    cache_limit: int | None,
    free_bytes: int | None = None,
    min_free_bytes: int = 0,
) -> Admission:
    """Decide whether an entry of ``incoming_bytes`` may be stored, and which entries to evict for it.

    After an admission the entries kept plus the incoming one hold at most ``cache_limit`` bytes. Evicted
    entries are unprotected and the least recently used ones: a prefix, by ``last_used``, of the
    unprotected entries, and no longer than needed. Nothing is evicted when the entry is not admitted.

    Args:
        entries: the complete entries now in the cache.
        incoming_bytes: size of the entry to store.
        cache_limit: bytes the cache may hold; ``None`` for no limit.
        free_bytes: free space on the cache's file system; ``None`` to skip the watermark.
        min_free_bytes: free space that must remain after storing the entry.

    Returns:
        The decision.

    Examples:
        >>> old = CacheEntry("a", 60, last_used=1)
        >>> mine = CacheEntry("b", 30, last_used=0, protected=True)
        >>> plan_admission([old, mine], 50, cache_limit=100)
        Admission(admit=True, evict=('a',), reason='evicted')
        >>> plan_admission([mine], 80, cache_limit=100)
        Admission(admit=False, evict=(), reason='full')
    """
    entries = list(entries)
    if cache_limit is not None and incoming_bytes > cache_limit:
        return Admission(False, (), "too_large")
    evict: list[str] = []
    freed = 0
    if cache_limit is not None:
        need = sum(entry.num_bytes for entry in entries) + incoming_bytes - cache_limit
        if need > 0:
            candidates = sorted((e for e in entries if not e.protected), key=lambda e: (e.last_used, e.name))
            for entry in candidates:
                if freed >= need:
                    break
                evict.append(entry.name)
                freed += entry.num_bytes
            if freed < need:
                return Admission(False, (), "full")
    if free_bytes is not None and free_bytes + freed - incoming_bytes < min_free_bytes:
        return Admission(False, (), "low_disk")
    return Admission(True, tuple(evict), "evicted" if evict else "fits")
