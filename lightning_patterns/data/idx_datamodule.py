"""``IDXDataModule``: train straight from MNIST-style IDX files at any URL, streamed and decoded as they arrive.

This is the book's ``tfio.IODataset.from_mnist(url_images, url_labels)`` for Lightning: no download step,
no local copy; the images and labels files (raw or ``.gz``) are read in blocks over HTTP, S3 or any fsspec
filesystem and decoded a chunk of samples at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from lightning_patterns import _lightning
from lightning_patterns._warnings import silence_known_noise
from lightning_patterns.data.streaming.idx import IDXDataset

if TYPE_CHECKING:
    from pytorch_lightning import LightningDataModule as _LightningDataModule
else:
    _LightningDataModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["IDXDataModule"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["IDXDataModule"])

silence_known_noise()


class _IDXDataModule(_LightningDataModule):
    """Streams IDX image and label files for training and validation.

    Args:
        train_images_url: URL of the training images file (``...-images-idx3-ubyte[.gz]``).
        train_labels_url: URL of the training labels file (``...-labels-idx1-ubyte[.gz]``).
        val_images_url: URL of the validation images file.
        val_labels_url: URL of the validation labels file.
        batch_size: samples per batch.
        storage_options: passed unchanged to fsspec.
    """

    def __init__(
        self,
        train_images_url: str,
        train_labels_url: str,
        val_images_url: str | None = None,
        val_labels_url: str | None = None,
        batch_size: int = 256,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if (val_images_url is None) != (val_labels_url is None):
            raise ValueError("Give both `val_images_url` and `val_labels_url`, or neither.")
        self.train_urls = (train_images_url, train_labels_url)
        self.val_urls = (val_images_url, val_labels_url) if val_images_url and val_labels_url else None
        self.batch_size = batch_size
        self.storage_options = storage_options

    def _loader(self, images_url: str, labels_url: str) -> DataLoader[Any]:
        dataset = IDXDataset(images_url, labels_url, self.storage_options)
        return DataLoader(dataset, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader[Any]:
        """Training samples in file order (IDX files are sequential streams)."""
        return self._loader(*self.train_urls)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        """Validation samples, if their URLs were given."""
        return self._loader(*self.val_urls) if self.val_urls else []


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    IDXDataModule = _IDXDataModule
