"""Suite-wide fixtures: Hypothesis profiles, a clean environment and no leftover process group."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

from lightning_patterns._lightning import installed_packages

# `ci` is bounded and derandomized so CI is repeatable; `dev` explores more; choose with HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class LightningPackage:
    """One Lightning package under test: its trainer module (``pl.Trainer``) and our classes built for it."""

    name: str
    pl: Any  # `pytorch_lightning` or `lightning.pytorch`
    classes: Any  # `lightning_patterns.pytorch_lightning` or `lightning_patterns.lightning`


@pytest.fixture(params=installed_packages())
def lightning_package(request: pytest.FixtureRequest) -> LightningPackage:
    """Each installed Lightning package in turn: Lightning-facing tests run against both."""
    name = request.param
    root = "lightning.pytorch" if name == "lightning" else "pytorch_lightning"
    return LightningPackage(name, importlib.import_module(root), importlib.import_module(f"lightning_patterns.{name}"))


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Tests that set rank variables or launch processes must not leak them into the next test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _destroy_process_group() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _single_thread_torch() -> Iterator[None]:
    # Two cores: keep intra-op threads from oversubscribing when tests start several processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
