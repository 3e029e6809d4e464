"""The small ABC every sharding rule implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["DEFAULT_SHARD_BYTES", "Sharder"]

DEFAULT_SHARD_BYTES = 32 * 2**20


class Sharder(ABC):
    """Decides which bucket each written sample goes to; the writer cuts each bucket into shard files.

    A bucket's buffer is closed into a shard file when the next sample would push it over ``shard_bytes``,
    so every shard of a bucket but its last is within one sample of the target. A single sample larger than
    the target gets a shard of its own.

    Subclasses set ``name`` (their registry key) and implement :meth:`bucket`, :meth:`to_json` and
    :meth:`from_arguments`.

    Args:
        shard_bytes: target size of one shard file in bytes.
    """

    name: ClassVar[str]

    def __init__(self, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(
                f"`shard_bytes` must be a positive int (target bytes per shard); got shard_bytes={shard_bytes!r}. "
                f"Try shard_bytes={DEFAULT_SHARD_BYTES} (32 MiB)."
            )
        self.shard_bytes = shard_bytes

    @property
    def num_buckets(self) -> int:
        """How many buckets :meth:`bucket` may return (bucket ids are ``0 .. num_buckets - 1``)."""
        return 1

    @abstractmethod
    def bucket(self, sample: Mapping[str, Any], index: int) -> int:
        """The bucket of ``sample``, the ``index``-th sample of the dataset (counting appended ones on)."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The manifest's ``"sharding"`` entry: ``{"rule": name, ...parameters}``."""

    @classmethod
    @abstractmethod
    def from_arguments(cls, *, shard_bytes: int | None, num_shards: int | None, hash_key: str | None) -> Sharder:
        """Build from :func:`~lightning_patterns.data.shards.write_dataset` arguments, rejecting irrelevant ones."""

    @classmethod
    @abstractmethod
    def from_json(cls, data: Mapping[str, Any], *, shard_bytes: int | None = None) -> Sharder:
        """Rebuild the rule a manifest recorded, to append to that dataset."""

    def check_schema(self, fields: list[str]) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise ``ValueError`` when the rule cannot work with samples having ``fields``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.to_json().items() if k != "rule")
        return f"{type(self).__name__}({params})"
