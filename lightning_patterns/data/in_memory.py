"""An in-memory DataModule over the synthetic Fashion-MNIST-shaped data: the baseline every pattern is read against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns import _lightning
from lightning_patterns.data.synthetic import fashion_like_arrays

if TYPE_CHECKING:
    from pytorch_lightning import LightningDataModule as _LightningDataModule
else:
    _LightningDataModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["InMemoryDataModule"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["InMemoryDataModule"])


class _InMemoryDataModule(_LightningDataModule):
    """Generates the synthetic dataset into memory and serves it through plain ``DataLoader`` s.

    Args:
        train_samples: number of training samples.
        val_samples: number of validation samples (also used for ``test``).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: fixes the generated data.
    """

    def __init__(
        self,
        train_samples: int = 60_000,
        val_samples: int = 10_000,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if train_samples < 1 or val_samples < 1:
            raise ValueError(
                f"`train_samples` and `val_samples` must be at least 1, got {train_samples=}, {val_samples=}."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got num_workers={num_workers!r}.")
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._datasets: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        """Generate the splits (deterministic in ``seed``)."""
        for split, count in (("train", self.train_samples), ("val", self.val_samples)):
            if split not in self._datasets:
                images, labels = fashion_like_arrays(count, split=split, seed=self.seed)
                self._datasets[split] = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

    def set_batch_size(self, batch_size: int, at_batch: int | None = None) -> None:
        """Serve ``batch_size`` samples per batch from the next loader built (``AdaptiveBatchSize`` calls this).

        Implements :class:`~lightning_patterns.adaptive.BatchSizeAdjustable` between epochs only: the Trainer
        applies it when it rebuilds the loaders (``AdaptiveBatchSize`` asks it to).
        """
        if at_batch is not None:
            raise ValueError(
                f"InMemoryDataModule changes its batch size between epochs only, got at_batch={at_batch!r}; "
                "pass at_batch=None and have the Trainer rebuild the loaders."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        self.batch_size = batch_size

    def _loader(self, split: str, shuffle: bool) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Validation batches in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """The validation split again, for ``lightning-patterns test``."""
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """The validation split, for ``lightning-patterns predict``."""
        return self._loader("val", shuffle=False)


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    InMemoryDataModule = _InMemoryDataModule
