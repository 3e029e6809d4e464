"""Fixtures of the cache tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cache_helpers import CountingSource, make_dataset


@pytest.fixture
def source(tmp_path: Path) -> CountingSource:
    root = tmp_path / "dataset"
    return CountingSource(root, make_dataset(root))
