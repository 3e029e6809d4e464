"""``CacheConfig``: which epoch cache a dataset keeps, as one value a recipe can write as a nested block.

A recipe (LightningCLI) reads it as

.. code-block:: yaml

    cache:
      name: disk
      cache_dir: /local/ssd/lightning_patterns
      cache_limit: 53687091200

and :func:`~lightning_patterns.data.caching.make_cache` builds the cache from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_patterns.data.caching.base import check_cache_limit

__all__ = ["CacheConfig"]


@dataclass(frozen=True)
class CacheConfig:
    """An epoch cache by registry name, with its options.

    Args:
        name: the cache's registry name: ``"memory"``, ``"disk"``, or one a plugin registers.
        cache_dir: folder of a disk cache (required by ``"disk"``, refused by ``"memory"``); the ranks and
            workers of a machine may share it.
        cache_limit: bytes the cache may hold (``None``: as much as the dataset).

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones) or a negative ``cache_limit``.

    Example:
        >>> CacheConfig("disk", cache_dir="/local/ssd/lp", cache_limit=50 * 2**30)
        CacheConfig(name='disk', cache_dir='/local/ssd/lp', cache_limit=53687091200)
    """

    name: str
    cache_dir: str | None = None
    cache_limit: int | None = None

    def __post_init__(self) -> None:
        # Imported here: the registry lives in the package's __init__, which imports this module.
        from lightning_patterns.data.caching import CACHES

        if self.name not in CACHES:
            raise ValueError(
                f"CacheConfig(name={self.name!r}) names no cache. Expected one of: "
                f"{', '.join(repr(name) for name in CACHES.names())}."
            )
        check_cache_limit(self.cache_limit)
