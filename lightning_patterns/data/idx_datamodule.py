"""``IDXDataModule``: train straight from MNIST-style IDX files at any URL, streamed and decoded as they arrive.

This is the book's ``tfio.IODataset.from_mnist(url_images, url_labels)`` for Lightning: no download step,
no local copy; the images and labels files (raw or ``.gz``) are read in blocks over HTTP, S3 or any fsspec
filesystem and decoded a window of samples at a time. Under DDP every rank reads its own share and yields
the same number of batches (the plan of sharded datasets, see :class:`~lightning_patterns.data.streaming.IDXDataset`);
``shuffle`` reshuffles every epoch; ``cache`` keeps the decompressed files so that later epochs read nothing
from the remote; the remote bytes and cache hits are reported to
:class:`~lightning_patterns.callbacks.DataMetricsCallback` like those of the streaming DataModule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_patterns import _lightning
from lightning_patterns._warnings import silence_known_noise
from lightning_patterns.data.caching import CacheConfig
from lightning_patterns.data.streaming.idx import IDXDataset
from lightning_patterns.data.streaming.idx_loader import IDXDataLoader
from lightning_patterns.data.streaming.topology import trainer_rank_and_world_size

if TYPE_CHECKING:
    from pytorch_lightning import LightningDataModule as _LightningDataModule
else:
    _LightningDataModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["IDXDataModule"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["IDXDataModule"])

silence_known_noise()


class _IDXDataModule(_LightningDataModule):
    """Streams IDX image and label files for training and validation, split evenly across the Trainer's ranks.

    Args:
        train_images_url: URL of the training images file (``...-images-idx3-ubyte[.gz]``).
        train_labels_url: URL of the training labels file (``...-labels-idx1-ubyte[.gz]``).
        val_images_url: URL of the validation images file.
        val_labels_url: URL of the validation labels file.
        batch_size: samples per batch, on each rank.
        storage_options: passed unchanged to fsspec.
        num_workers: DataLoader worker processes per rank.
        shuffle: shuffle the training samples every epoch (span order, then windows), the same way on every rank.
        seed: shuffle seed, the same on every rank.
        drop_last: drop up to ``world_size - 1`` training samples per epoch instead of repeating as many.
        shuffle_window: samples per window of the within-worker shuffle.
        span_samples: samples per span, the unit whose order ``shuffle`` permutes every epoch (which samples
            each rank gets changes by spans); also the decode step without ``shuffle``.
        cache: ``"memory"`` (one copy per rank, shared by its workers), ``"disk"`` (one per machine, reused by later
            runs; needs ``cache_dir``), a :class:`~lightning_patterns.data.caching.CacheConfig`, or ``None``: keep
            the decompressed files so that epochs after the first read nothing from the remote.
        cache_dir: folder of the disk cache.
        cache_limit: bytes the cache may hold, with a cache name.
    """

    def __init__(
        self,
        train_images_url: str,
        train_labels_url: str,
        val_images_url: str | None = None,
        val_labels_url: str | None = None,
        batch_size: int = 256,
        storage_options: dict[str, Any] | None = None,
        num_workers: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_window: int = 1024,
        span_samples: int = 1024,
        cache: str | CacheConfig | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got num_workers={num_workers!r}.")
        if (val_images_url is None) != (val_labels_url is None):
            raise ValueError("Give both `val_images_url` and `val_labels_url`, or neither.")
        self.train_urls = (train_images_url, train_labels_url)
        self.val_urls = (val_images_url, val_labels_url) if val_images_url and val_labels_url else None
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_window = shuffle_window
        self.span_samples = span_samples
        self.cache = cache
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        self.loaders: dict[str, IDXDataLoader] = {}

    def _loader(self, split: str, images_url: str, labels_url: str) -> IDXDataLoader:
        if split not in self.loaders:
            rank, world_size = trainer_rank_and_world_size(self.trainer)
            training = split == "train"
            dataset = IDXDataset(
                images_url,
                labels_url,
                self.storage_options,
                self.span_samples,
                batch_size=self.batch_size,
                shuffle=self.shuffle and training,
                seed=self.seed,
                drop_last=self.drop_last and training,
                shuffle_window=self.shuffle_window,
                rank=rank,
                world_size=world_size,
                cache=self.cache,
                cache_dir=self.cache_dir,
                cache_limit=self.cache_limit,
            )
            self.loaders[split] = IDXDataLoader(dataset, num_workers=self.num_workers, epoch_source=self._epoch)
        return self.loaders[split]

    def _epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self) -> IDXDataLoader:
        """This rank's share of the training samples (shuffled every epoch with ``shuffle``)."""
        return self._loader("train", *self.train_urls)

    def val_dataloader(self) -> IDXDataLoader | list[Any]:
        """This rank's share of the validation samples, if their URLs were given."""
        return self._loader("val", *self.val_urls) if self.val_urls else []

    def metrics(self) -> dict[str, dict[str, float]]:
        """This rank's counters (samples, remote bytes, cache hits...) for every split that was read."""
        return {split: loader.metrics() for split, loader in self.loaders.items()}


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    IDXDataModule = _IDXDataModule
