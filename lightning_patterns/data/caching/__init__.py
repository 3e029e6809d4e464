"""Epoch caching: keep the shards read in epoch 1 so later epochs never touch the remote.

Caches by registry name:

- ``"memory"`` (:class:`MemoryEpochCache`): one shared-memory copy per rank, read by all its DataLoader workers.
- ``"disk"`` (:class:`DiskEpochCache`): verified files in ``cache_dir``, shared by every process of a machine and
  reused by later runs, also after a crash.

Third parties register more through the ``lightning_patterns.caches`` entry-point group, or with
``CACHES.register(name, cls)``; a cache class subclasses :class:`EpochCache`.
"""

from __future__ import annotations

from lightning_patterns._registry import Registry
from lightning_patterns.data.caching.base import EpochCache, check_cache_limit
from lightning_patterns.data.caching.config import CacheConfig
from lightning_patterns.data.caching.disk import CacheEntryCorruptWarning, DiskEpochCache
from lightning_patterns.data.caching.layout import CacheInfo, cache_info, clear_cache, default_cache_dir
from lightning_patterns.data.caching.locks import CacheLockTimeoutError
from lightning_patterns.data.caching.memory import MemoryEpochCache

__all__ = [
    "CACHES",
    "CacheConfig",
    "CacheEntryCorruptWarning",
    "CacheInfo",
    "CacheLockTimeoutError",
    "DiskEpochCache",
    "EpochCache",
    "MemoryEpochCache",
    "cache_info",
    "clear_cache",
    "default_cache_dir",
    "make_cache",
]

CACHES: Registry[type[EpochCache]] = Registry("cache", entry_point_group="lightning_patterns.caches")
for _cls in (MemoryEpochCache, DiskEpochCache):
    CACHES.register(_cls.name, _cls)
del _cls


def make_cache(
    cache: str | CacheConfig | EpochCache | None, *, cache_dir: str | None, cache_limit: int | None
) -> EpochCache | None:
    """The cache a dataset asked for by name, :class:`CacheConfig` or instance; ``None`` for no cache.

    Args:
        cache: a registry name (``"memory"``, ``"disk"``), a :class:`CacheConfig`, an :class:`EpochCache`, or
            ``None``.
        cache_dir: folder of a disk cache (required by ``"disk"``), with a name only.
        cache_limit: bytes the cache may hold (``None``: as much as the dataset), with a name only.

    Raises:
        ValueError: an unknown name, ``"disk"`` without ``cache_dir``, a negative ``cache_limit``, or options given
            that the chosen cache would ignore.

    Examples:
        >>> make_cache("memory", cache_dir=None, cache_limit=2**20)
        MemoryEpochCache(cache_limit=1048576, capacity=0)
        >>> make_cache(None, cache_dir=None, cache_limit=None) is None
        True
    """
    check_cache_limit(cache_limit)
    if cache is None or isinstance(cache, EpochCache | CacheConfig):
        given = [
            f"{name}={value!r}"
            for name, value in (("cache_dir", cache_dir), ("cache_limit", cache_limit))
            if value is not None
        ]
        if given:
            if cache is None:
                fix = "pass cache='disk' (or 'memory') to cache, or drop them"
            elif isinstance(cache, CacheConfig):
                fix = "set them in the CacheConfig instead"
            else:
                fix = f"set them on the {type(cache).__name__} instance instead"
            raise ValueError(f"{', '.join(given)} given with cache={cache!r}, which would ignore them: {fix}.")
        if isinstance(cache, CacheConfig):
            return CACHES.get(cache.name).from_options(cache_dir=cache.cache_dir, cache_limit=cache.cache_limit)
        return cache
    if not isinstance(cache, str) or cache not in CACHES:
        raise ValueError(
            f"Unknown cache {cache!r}. Expected one of: {', '.join(repr(n) for n in CACHES.names())}, an EpochCache "
            "instance, or None for no cache."
        )
    return CACHES.get(cache).from_options(cache_dir=cache_dir, cache_limit=cache_limit)
