"""Helpers of the cache tests: a small sharded dataset on local disk and a fetch() that counts what it reads.

A module of its own (not conftest.py): ``from conftest import ...`` can resolve to another folder's conftest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.shards.manifest import Manifest, load_manifest


class CountingSource:
    """Plays the remote: ``fetcher(i)`` returns a fetch() for shard i and counts calls and bytes."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.calls: list[int] = []
        self.bytes = 0
        self._lock = threading.Lock()

    def fetcher(self, shard: int) -> Callable[[], bytes]:
        def fetch() -> bytes:
            data = (self.root / self.manifest.shards[shard].path).read_bytes()
            with self._lock:
                self.calls.append(shard)
                self.bytes += len(data)
            return data

        return fetch

    def expected(self, shard: int) -> bytes:
        return (self.root / self.manifest.shards[shard].path).read_bytes()


def make_dataset(root: Path, num_samples: int = 600, seed: int = 0) -> Manifest:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(num_samples, 8, 8), dtype=np.uint8)
    samples = [{"image": images[i], "label": i} for i in range(num_samples)]
    write_dataset(samples, str(root), shard_bytes=8 * 1024, progress=False)
    return load_manifest(str(root))
