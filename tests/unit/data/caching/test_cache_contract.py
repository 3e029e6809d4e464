"""Every registered epoch cache (memory, disk, and any a plugin registers) runs the whole cache contract."""

from __future__ import annotations

from pathlib import Path

from lightning_patterns.data.caching import DiskEpochCache, EpochCache
from lightning_patterns.testing.contracts import EpochCacheContract


class TestEveryCache(EpochCacheContract):
    """The contract of `lightning_patterns.testing.contracts.caches`, once per cache of `CACHES`."""

    def new_cache(self, cache_name: str, folder: Path, cache_limit: int | None = None) -> EpochCache:
        if cache_name == DiskEpochCache.name:
            # Its free-space watermark (1 GiB by default) must not make the contract depend on the test machine.
            return DiskEpochCache(folder, cache_limit=cache_limit, min_free_bytes=0)
        return super().new_cache(cache_name, folder, cache_limit)
