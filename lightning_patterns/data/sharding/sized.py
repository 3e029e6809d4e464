"""``"size"``: sequential shards of a target byte size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from lightning_patterns.data.sharding.base import DEFAULT_SHARD_BYTES, Sharder

__all__ = ["SizeSharder"]


class SizeSharder(Sharder):
    """Writes samples in order into shards of about ``shard_bytes`` each.

    A shard is closed when the next sample would push it over the target, so all shards but the last hold
    more than ``shard_bytes`` minus one sample and at most ``shard_bytes`` (unless one sample alone exceeds it).

    Args:
        shard_bytes: target size of one shard file in bytes.
    """

    name: ClassVar[str] = "size"

    def bucket(self, sample: Mapping[str, Any], index: int) -> int:
        """Every sample goes to the single bucket 0."""
        return 0

    def to_json(self) -> dict[str, Any]:
        """``{"rule": "size", "shard_bytes": B}``."""
        return {"rule": self.name, "shard_bytes": self.shard_bytes}

    @classmethod
    def from_arguments(cls, *, shard_bytes: int | None, num_shards: int | None, hash_key: str | None) -> SizeSharder:
        """Build from writer arguments; ``num_shards`` and ``hash_key`` belong to ``sharding="hash"``."""
        for arg, value in (("num_shards", num_shards), ("hash_key", hash_key)):
            if value is not None:
                raise ValueError(
                    f"`{arg}={value!r}` only applies to sharding='hash', but sharding='size' was chosen. "
                    f"Drop `{arg}` or pass sharding='hash'."
                )
        return cls(DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, shard_bytes: int | None = None) -> SizeSharder:
        """Rebuild from ``{"rule": "size", "shard_bytes": B}``; a different ``shard_bytes`` is refused."""
        recorded = data.get("shard_bytes")
        if not isinstance(recorded, int):
            raise ValueError(f"The manifest's size sharding entry {dict(data)!r} lacks an int 'shard_bytes'.")
        if shard_bytes is not None and shard_bytes != recorded:
            raise ValueError(
                f"The dataset was written with shard_bytes={recorded}, but shard_bytes={shard_bytes} was passed "
                f"to append. Drop `shard_bytes` (or pass {recorded}) to keep one rule per dataset."
            )
        return cls(recorded)
