"""Fixtures for streaming tests: small indexed datasets with deliberately uneven shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards import write_dataset


def indexed_samples(n: int) -> dict[str, np.ndarray]:
    """Columns of ``n`` samples whose ``index`` field tells each one apart."""
    rng = np.random.default_rng(n)
    return {
        "index": np.arange(n, dtype=np.int64),
        "image": rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8),
        "label": (np.arange(n) % 10).astype(np.int64),
    }


class _Columns:
    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["index"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {name: column[i] for name, column in self.columns.items()}


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., str]:
    """``make_dataset(n, num_shards=7)``: hash-sharded (so uneven) local dataset of ``n`` indexed samples."""

    def make(n: int, num_shards: int = 7, name: str = "data") -> str:
        url = str(tmp_path / name)
        write_dataset(_Columns(indexed_samples(n)), url, num_shards=num_shards, progress=False)
        return url

    return make
