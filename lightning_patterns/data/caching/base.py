"""The contract every epoch cache keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from lightning_patterns.data.shards.manifest import Manifest

__all__ = ["EpochCache"]


class EpochCache(ABC):
    """Keeps verified shard bytes for later epochs.

    A dataset calls :meth:`bind` once in its constructor (in the main process, before any DataLoader
    worker starts), then :meth:`get_or_fetch` from any worker process and any of its threads.
    """

    name: ClassVar[str]

    @abstractmethod
    def bind(self, manifest: Manifest) -> None:
        """Prepare for the dataset described by ``manifest`` (its content keys the entries)."""

    @abstractmethod
    def get_or_fetch(self, shard: int, fetch: Callable[[], bytes]) -> Any:
        """The bytes of shard ``shard`` (index into ``manifest.shards``): cached, else ``fetch()``-ed and kept."""

    @abstractmethod
    def stats(self) -> tuple[int, int]:
        """``(hits, misses)`` counted in this process."""
