"""Writing the embedded default datasets: deterministic, reused between runs, never downloaded.

``ShardedStreamingDataModule`` generates and serves one of :data:`EmbeddedDataset`: Fashion-MNIST-shaped images
(``embedded``: :class:`EmbeddedFashionMNIST`, the main job's) or synthetic click-through impressions
(``embedded_click_through``: :class:`EmbeddedClickThrough`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_patterns.data.caching.layout import default_cache_dir

__all__ = [
    "EmbeddedClickThrough",
    "EmbeddedDataset",
    "EmbeddedFashionMNIST",
    "default_data_root",
    "prepare_embedded_dataset",
]

log = logging.getLogger(__name__)


def default_data_root() -> Path:
    """``$LIGHTNING_PATTERNS_CACHE/demo``, else ``~/.cache/lightning_patterns/demo``."""
    return Path(default_cache_dir()) / "demo"


def _check_sizes(source: EmbeddedFashionMNIST | EmbeddedClickThrough) -> None:
    if source.train_samples < 1 or source.val_samples < 1:
        raise ValueError(
            f"{type(source).__name__} needs at least one sample per split, got train_samples={source.train_samples}, "
            f"val_samples={source.val_samples}."
        )
    if source.shard_bytes < 1:
        raise ValueError(f"`shard_bytes` must be positive, got shard_bytes={source.shard_bytes}.")


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
        _check_sizes(self)

    @property
    def root(self) -> Path:
        """The folder holding ``train/`` and ``val/``."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        name = f"fashion_like-{self.train_samples}-{self.val_samples}-seed{self.seed}-{self.shard_bytes}"
        return default_data_root() / name

    def samples(self, split: str, count: int) -> Iterable[dict[str, Any]]:
        """The ``count`` samples of ``split``, for the shard writer."""
        from lightning_patterns.data.synthetic import FashionLikeSamples

        return FashionLikeSamples(count, split=split, seed=self.seed)


@dataclass(frozen=True)
class EmbeddedClickThrough:
    """A synthetic click-through dataset from a known latent-factor model, served from 127.0.0.1.

    See :mod:`lightning_patterns.data.click_through` for the model and the fields. The defaults train
    :class:`~lightning_patterns.models.EmbeddingCTR` to within 0.01 of the generating model's validation AUC in
    one pass; ``num_items=10_000_000`` makes the item table 10M rows (most of them rarely seen, so the AUC gap
    widens: that setting measures tables, not accuracy).

    Args:
        train_samples: training impressions.
        val_samples: validation impressions.
        num_users: rows of the user table.
        num_items: rows of the item table.
        num_dense: dense features per impression.
        latent_dim: dimension of the generating model's user and item factors.
        user_exponent: Zipf exponent of user popularity.
        item_exponent: Zipf exponent of item popularity.
        seed: fixes the generating model and every sample.
        shard_bytes: target bytes per shard.
        data_dir: where the shards are written (default: a folder under :func:`default_data_root` named after
            the other settings, reused by later runs).
    """

    train_samples: int = 4_000_000
    val_samples: int = 100_000
    num_users: int = 1_000
    num_items: int = 10_000
    num_dense: int = 4
    latent_dim: int = 4
    user_exponent: float = 1.1
    item_exponent: float = 1.1
    seed: int = 0
    shard_bytes: int = 8 * 2**20
    data_dir: str | None = None

    def __post_init__(self) -> None:
        _check_sizes(self)
        self.model()  # checks the model's arguments now, not when the first split is written

    def model(self) -> Any:
        """The generating :class:`~lightning_patterns.data.click_through.ClickThroughModel`."""
        from lightning_patterns.data.click_through import ClickThroughModel

        return ClickThroughModel(
            num_users=self.num_users,
            num_items=self.num_items,
            num_dense=self.num_dense,
            latent_dim=self.latent_dim,
            user_exponent=self.user_exponent,
            item_exponent=self.item_exponent,
            seed=self.seed,
        )

    @property
    def root(self) -> Path:
        """The folder holding ``train/`` and ``val/``."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        settings = {key: value for key, value in asdict(self).items() if key != "data_dir"}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return default_data_root() / f"click_through-{self.train_samples}-{self.num_items}-{digest}"

    def samples(self, split: str, count: int) -> Iterable[dict[str, Any]]:
        """The ``count`` samples of ``split``, for the shard writer."""
        from lightning_patterns.data.click_through import ClickThroughSamples

        return ClickThroughSamples(self.model(), count, split=split)


#: The datasets ``ShardedStreamingDataModule`` can generate and serve.
EmbeddedDataset = EmbeddedFashionMNIST | EmbeddedClickThrough


def prepare_embedded_dataset(source: EmbeddedDataset, *, progress: bool = True) -> Path:
    """Write the dataset's ``train`` and ``val`` splits to shards unless a previous run already did."""
    # Imported here: `lightning-patterns cache` reads `default_data_root` without the shard writer's imports.
    from lightning_patterns.data.shards import manifest_exists, write_dataset

    root = source.root
    for split, count in (("train", source.train_samples), ("val", source.val_samples)):
        url = str(root / split)
        if manifest_exists(url):
            continue
        log.info("Generating %s %s samples into %s", count, split, url)
        samples = source.samples(split, count)
        # "overwrite" replaces what an interrupted earlier run may have left (never a published dataset).
        write_dataset(samples, url, shard_bytes=source.shard_bytes, mode="overwrite", progress=progress)
    return root
