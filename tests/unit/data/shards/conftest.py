"""Fixtures for shard tests: a fresh memory:// root per test, cleaned afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A unique ``memory://`` dataset root; fsspec's memory store is global, so remove it afterwards."""
    root = f"/shards-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    for path in [p for p in fs.store if p.startswith(root)]:
        fs.store.pop(path, None)
    fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.startswith(root)]


def _mnist_like(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return [{"image": images[i], "label": np.int64(i % 10)} for i in range(n)]


@pytest.fixture
def mnist_like() -> Callable[..., list[dict[str, Any]]]:
    """``mnist_like(n, seed=0)``: n samples of a uint8 28x28 image and an int64 label."""
    return _mnist_like
