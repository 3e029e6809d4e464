"""``IDXDataLoader``: a DataLoader for :class:`~lightning_patterns.data.streaming.idx.IDXDataset` that sets the epoch.

DataLoader workers iterate copies of the dataset made at each ``iter()``, so the epoch (which seeds the
shuffle) must be set in the main process before they start: the loader does it, counting its iterations or
asking ``epoch_source`` (the Trainer's ``current_epoch``, so a resumed run shuffles as the epoch it resumes).
It lays out the dataset's cache before the workers start, so that they share a memory cache, and reports
the dataset's counters with the time spent waiting for batches (:meth:`metrics`, read by
:class:`~lightning_patterns.callbacks.DataMetricsCallback`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from lightning_patterns._warnings import silence_known_noise
from lightning_patterns.data.streaming.idx import IDXDataset
from lightning_patterns.data.streaming.metrics import timed

__all__ = ["IDXDataLoader"]

silence_known_noise()


class IDXDataLoader(DataLoader[dict[str, Any]]):
    """Iterates an :class:`IDXDataset` that yields whole batches; one epoch per ``iter()``.

    Args:
        dataset: the dataset; its ``batch_size`` must be set (batches are decoded whole, not collated).
        num_workers: DataLoader worker processes.
        epoch_source: returns the epoch to read at each ``iter()``; ``None`` counts from the dataset's epoch.
        **kwargs: further ``DataLoader`` arguments (``pin_memory``, ``timeout``, ``multiprocessing_context``...);
            ``batch_size``, ``shuffle`` and ``sampler`` are the dataset's to decide.

    Raises:
        ValueError: the dataset has no ``batch_size``, or ``kwargs`` sets what the dataset decides.
    """

    def __init__(
        self,
        dataset: IDXDataset,
        num_workers: int = 0,
        epoch_source: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        if dataset.batch_size is None:
            raise ValueError(
                "IDXDataLoader needs the dataset to yield whole batches: construct it with "
                "`IDXDataset(images_url, labels_url, batch_size=N)`."
            )
        taken = sorted({"batch_size", "shuffle", "sampler", "batch_sampler"} & set(kwargs))
        if taken:
            raise ValueError(
                f"IDXDataLoader decides {', '.join(taken)} itself: set batching and shuffling on the IDXDataset."
            )
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self.idx_dataset = dataset
        dataset.prepare()  # headers read and the cache laid out here, before any worker starts
        self._epoch_source = epoch_source
        self._next_epoch = dataset.epoch
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]  # a generator over the base's iterator
        dataset = self.idx_dataset
        epoch = self._epoch_source() if self._epoch_source is not None else self._next_epoch
        dataset.set_epoch(epoch)
        self._next_epoch = epoch + 1
        return timed(super().__iter__(), self._waited)

    def _waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def metrics(self) -> dict[str, float]:
        """Counters of this rank: samples, remote bytes and requests, retries, cache hits, seconds waited for data."""
        return {**self.idx_dataset.metrics(), "loader_wait_seconds": self.wait_seconds}
