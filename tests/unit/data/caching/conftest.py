"""Fixtures of the cache tests: the contract's dataset and counting fetches, for the cache-specific tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_patterns.testing.contracts import CountingSource, write_small_dataset


@pytest.fixture
def source(tmp_path: Path) -> CountingSource:
    root = tmp_path / "dataset"
    return CountingSource(root, write_small_dataset(root))
