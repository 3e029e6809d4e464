"""Writing the embedded default dataset: deterministic, reused between runs, never downloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lightning_patterns.data.caching.layout import default_cache_dir

__all__ = ["EmbeddedFashionMNIST", "default_data_root", "prepare_embedded_dataset"]

log = logging.getLogger(__name__)


def default_data_root() -> Path:
    """``$LIGHTNING_PATTERNS_CACHE/demo``, else ``~/.cache/lightning_patterns/demo``."""
    return Path(default_cache_dir()) / "demo"


@dataclass(frozen=True)
class EmbeddedFashionMNIST:
    """A generated Fashion-MNIST-shaped dataset (28×28 uint8 images, 10 classes) served from 127.0.0.1.

    Args:
        train_samples: training samples.
        val_samples: validation samples.
        seed: fixes every generated sample.
        shard_bytes: target bytes per shard.
        data_dir: where the shards are written (default: a folder under :func:`default_data_root` named
            after the other settings, reused by later runs).
    """

    train_samples: int = 60_000
    val_samples: int = 10_000
    seed: int = 0
    shard_bytes: int = 8 * 2**20
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.train_samples < 1 or self.val_samples < 1:
            raise ValueError(
                f"EmbeddedFashionMNIST needs at least one sample per split, got train_samples={self.train_samples}, "
                f"val_samples={self.val_samples}."
            )
        if self.shard_bytes < 1:
            raise ValueError(f"`shard_bytes` must be positive, got shard_bytes={self.shard_bytes}.")

    @property
    def root(self) -> Path:
        """The folder holding ``train/`` and ``val/``."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        name = f"fashion_like-{self.train_samples}-{self.val_samples}-seed{self.seed}-{self.shard_bytes}"
        return default_data_root() / name


def prepare_embedded_dataset(source: EmbeddedFashionMNIST, *, progress: bool = True) -> Path:
    """Write the dataset's ``train`` and ``val`` splits to shards unless a previous run already did."""
    # Imported here: `lightning-patterns cache` reads `default_data_root` without the shard writer's imports.
    from lightning_patterns.data.shards import manifest_exists, write_dataset
    from lightning_patterns.data.synthetic import FashionLikeSamples

    root = source.root
    for split, count in (("train", source.train_samples), ("val", source.val_samples)):
        url = str(root / split)
        if manifest_exists(url):
            continue
        log.info("Generating %s %s samples into %s", count, split, url)
        samples = FashionLikeSamples(count, split=split, seed=source.seed)
        # "overwrite" replaces what an interrupted earlier run may have left (never a published dataset).
        write_dataset(samples, url, shard_bytes=source.shard_bytes, mode="overwrite", progress=progress)
    return root
