"""Random access to a sharded dataset: sample ``i`` through the blocks that hold it, not the whole shard.

:class:`SampleReader` is what ``StreamingDataset[i]`` uses. For a shard with a block table (see
:mod:`~lightning_patterns.data.shards.layout`) it reads the shard's head once (kept for the next samples of
that shard), then only the blocks holding sample ``i`` of each field, each verified against the table. A
shard written without a block table is fetched whole and verified against the manifest, and the last such
shard is kept, so consecutive samples of it cost one fetch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from lightning_patterns.data.remote import RemoteReader
from lightning_patterns.data.shards.manifest import Manifest, fetch_shard, open_shard, shard_url
from lightning_patterns.data.shards.partial import ShardHead, fetch_head, fetch_rows
from lightning_patterns.data.shards.reader import ShardReader

__all__ = ["SampleMap", "SampleReader"]

# Heads kept for later samples (a head is ~1/2000 of its shard).
_HEADS = 64


class SampleReader:
    """Reads single samples of a dataset by global index, fetching only what holds them.

    Safe to use from several threads. Pickles by its arguments (its caches start empty in a new process), so
    it can go to DataLoader workers inside :meth:`as_map_dataset`.

    Args:
        reader: reads the dataset (its ``url`` is the dataset root).
        manifest: the dataset's manifest.
        verify: check every block (or whole shard) against the manifest.
    """

    def __init__(self, reader: RemoteReader, manifest: Manifest, *, verify: bool = True) -> None:
        self.reader = reader
        self.manifest = manifest
        self.verify = verify
        self._offsets = np.concatenate([[0], np.cumsum([s.num_samples for s in manifest.shards])]).astype(np.int64)
        self._heads: OrderedDict[int, ShardHead] = OrderedDict()
        self._whole: tuple[int, ShardReader] | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.reader, self.manifest, self.verify))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, row)`` of global sample ``index`` (negative counts from the end).

        Raises:
            IndexError: ``index`` is out of range.
        """
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"A sample index must be an int, got {type(index).__name__}.")
        if not -n <= index < n:
            raise IndexError(f"Sample index {index} is out of range for a dataset of {n} samples.")
        index = int(index) + n if index < 0 else int(index)
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def read(self, index: int) -> dict[str, Any]:
        """Sample ``index`` as :meth:`~lightning_patterns.data.shards.ShardReader.read` decodes it."""
        shard, row = self.locate(index)
        info = self.manifest.shards[shard]
        url = shard_url(self.reader.url, info.path)
        if not info.has_blocks:
            return self._whole_shard(shard).read(row)
        head = self._head(shard, url)

        def fetch(ranges: list[tuple[int, int]], buffer: memoryview) -> None:
            for start, stop in ranges:
                self.reader.read_range_into(info.path, start, buffer[start:stop])

        return fetch_rows(head, [(row, row + 1)], fetch, verify=self.verify).read(row)

    def _head(self, shard: int, url: str) -> ShardHead:
        with self._lock:
            head = self._heads.get(shard)
            if head is not None:
                self._heads.move_to_end(shard)
                return head
        info = self.manifest.shards[shard]
        head = fetch_head(
            lambda start, stop: self.reader.read_range(info.path, start, stop),
            info,
            self.manifest.schema,
            url,
            verify=self.verify,
        )
        with self._lock:
            self._heads[shard] = head
            while len(self._heads) > _HEADS:
                self._heads.popitem(last=False)
        return head

    def _whole_shard(self, shard: int) -> ShardReader:
        with self._lock:
            kept = self._whole
        if kept is not None and kept[0] == shard:
            return kept[1]
        info = self.manifest.shards[shard]
        data = fetch_shard(self.reader, info, verify=self.verify)
        opened = open_shard(data, info, self.manifest.schema, shard_url(self.reader.url, info.path))
        with self._lock:
            self._whole = (shard, opened)
        return opened

    def as_map_dataset(self) -> SampleMap:
        """A map-style ``torch.utils.data.Dataset`` of every sample (for a ``DataLoader`` with a sampler)."""
        return SampleMap(self)


class SampleMap:
    """A map-style view of a dataset: ``len()`` samples, ``view[i]`` sample ``i`` through a :class:`SampleReader`.

    It quacks like a ``torch.utils.data.Dataset`` (``__len__`` and ``__getitem__``), so a ``DataLoader`` with
    any sampler reads it, in worker processes too.

    Args:
        samples: the reader it reads through.
    """

    def __init__(self, samples: SampleReader) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples.read(index)


def _rebuild(reader: RemoteReader, manifest: Manifest, verify: bool) -> SampleReader:
    return SampleReader(reader, manifest, verify=verify)
