"""Fixtures for the data tests (``memory_url`` is suite-wide, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


def _mnist_like(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return [{"image": images[i], "label": np.int64(i % 10)} for i in range(n)]


@pytest.fixture
def mnist_like() -> Callable[..., list[dict[str, Any]]]:
    """``mnist_like(n, seed=0)``: n samples of a uint8 28x28 image and an int64 label."""
    return _mnist_like
