"""Epoch caching: keep the shards read in epoch 1 so later epochs never touch the remote.

PLACEHOLDER: the caching implementation (issue 5) lands here; ``make_cache`` returns no cache until then.
"""

from __future__ import annotations

from lightning_patterns.data.caching.base import EpochCache

__all__ = ["EpochCache", "make_cache"]


def make_cache(cache: str | EpochCache | None, *, cache_dir: str | None, cache_limit: int | None) -> EpochCache | None:
    """The cache a dataset asked for by name or instance; ``None`` for no cache."""
    if cache is None or isinstance(cache, EpochCache):
        return cache
    raise ValueError(f"Unknown cache {cache!r}; caching is not implemented yet.")
