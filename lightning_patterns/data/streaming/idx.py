"""Stream MNIST-style IDX files (raw or gzip) from any fsspec URL, decoding incrementally, sharded over ranks.

The files are read in blocks through retried range requests (see :class:`RemoteReader`), gzip is
decompressed on the fly, and samples are decoded a window at a time: no local copy is made and the file
is never held in memory whole (unless a ``cache`` is asked for). This is the streaming counterpart of
``tfio.IODataset.from_mnist``.

Which samples a rank and DataLoader worker yields is the plan of
:mod:`~lightning_patterns.data.sharding.assignment`, the one sharded datasets use, with the pair as one
"shard" cut into spans of ``chunk_samples``: every rank yields the same number of samples and batches
(padding with at most ``world_size - 1`` repeats, or dropping as many with ``drop_last``), workers get
whole batches, and ``shuffle`` permutes the span order per epoch and the samples within windows of
``shuffle_window``, seeded by ``(seed, epoch)`` the same on every rank. A gzip file read from the remote
cannot seek back cheaply, so each worker then reads its spans in file order (the window shuffle still
applies); raw files and cached pairs are read in the plan's order. The IDX format itself is in
:mod:`.idx_format`, the reading and caching in :mod:`.idx_source`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lightning_patterns.data.caching import CacheConfig, EpochCache, make_cache
from lightning_patterns.data.remote import FetchStats, FetchStatsSnapshot, RetryPolicy
from lightning_patterns.data.sharding.assignment import PlanConfig, WorkerPlan, plan, samples_per_rank
from lightning_patterns.data.sharding.topology import Topology
from lightning_patterns.data.streaming.idx_format import IDXHeader, read_idx_header
from lightning_patterns.data.streaming.idx_source import IDXFiles
from lightning_patterns.data.streaming.metrics import StreamCounters
from lightning_patterns.data.streaming.topology import current_worker, resolve_rank

__all__ = ["IDXDataset", "IDXHeader", "read_idx_header"]


class IDXDataset(IterableDataset[dict[str, torch.Tensor]]):
    """An iterable dataset of ``{"image": uint8 (rows, cols), "label": int64 0-d}`` streamed from IDX files.

    Works with MNIST and Fashion-MNIST as published (``*-idx3-ubyte.gz`` / ``*-idx1-ubyte.gz``) on any fsspec
    URL: HTTP(S), S3, GCS, ``memory://``, local files. Gzip is detected from the ``.gz`` suffix or the gzip
    magic bytes. Reads are retried and resume from the offset reached, as in :class:`RemoteReader`.

    Each rank and DataLoader worker yields its own share (see the module docs), so under DDP the ranks read
    disjoint parts of the files and yield the same number of batches. With ``batch_size`` the dataset yields
    whole batches (use ``DataLoader(dataset, batch_size=None)``, or
    :class:`~lightning_patterns.data.streaming.idx_loader.IDXDataLoader`, which also advances the epoch);
    else single samples. Iterating the dataset also feeds a shard writer, which accepts any iterable of dict
    samples.

    Args:
        images_url: URL of the images file (magic ``0x00000803``).
        labels_url: URL of the labels file (magic ``0x00000801``).
        storage_options: Passed unchanged to fsspec for both URLs.
        chunk_samples: Samples per span of the plan (the unit whose order ``shuffle`` permutes) and per decode
            step when not shuffling; bounds the memory held besides one read block.
        retry: Retry policy for the remote reads; ``RetryPolicy()`` when ``None``.
        block_size: Bytes per range request.
        stats: Counters of remote bytes, requests and retries; a new :class:`FetchStats` when ``None``.
        batch_size: Samples per yielded batch; ``None`` yields single samples.
        shuffle: Shuffle the span order every epoch, then the samples within windows of ``shuffle_window``.
        seed: Shuffle seed shared by every rank, ``>= 0``.
        drop_last: Drop up to ``world_size - 1`` samples per epoch instead of repeating as many.
        shuffle_window: Samples per window of the within-worker shuffle.
        rank: This process's rank; by default from torch.distributed or the ``RANK`` environment variable.
        world_size: Number of ranks, given together with ``rank``.
        cache: Keep the decompressed files for later epochs: ``"memory"`` (one copy per rank, shared by its
            workers), ``"disk"`` (needs ``cache_dir``; one copy per machine, reused by later runs), a
            :class:`~lightning_patterns.data.caching.CacheConfig` or cache instance of those kinds, or ``None``.
        cache_dir: Folder of the disk cache.
        cache_limit: Bytes the cache may hold, with a cache name.

    Example:
        >>> import fsspec
        >>> with fsspec.open("memory://doc/idx/images", "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4]))
        >>> with fsspec.open("memory://doc/idx/labels", "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
        >>> dataset = IDXDataset("memory://doc/idx/images", "memory://doc/idx/labels", rank=0, world_size=1)
        >>> [(s["image"].tolist(), int(s["label"])) for s in dataset], len(dataset)
        ([([[1, 2], [3, 4]], 7)], 1)
    """

    def __init__(
        self,
        images_url: str,
        labels_url: str,
        storage_options: Mapping[str, Any] | None = None,
        chunk_samples: int = 1024,
        *,
        retry: RetryPolicy | None = None,
        block_size: int = 2**20,
        stats: FetchStats | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_window: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        cache: str | CacheConfig | EpochCache | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("images_url", images_url), ("labels_url", labels_url)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"IDXDataset({arg}={value!r}) must be a non-empty URL, e.g. 'https://host/file.gz'.")
        for arg, number in (("chunk_samples", chunk_samples), ("block_size", block_size)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"IDXDataset({arg}={number!r}) must be a positive integer.")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"IDXDataset(batch_size={batch_size!r}) must be a positive integer or None.")
        # Checked now; the number of samples comes with the headers.
        self._settings = PlanConfig((), batch_size or 1, seed, shuffle, drop_last, shuffle_window, chunk_samples)
        resolve_rank(rank, world_size)
        self._rank, self._world_size = rank, world_size
        self.images_url = images_url
        self.labels_url = labels_url
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.chunk_samples = chunk_samples
        self.block_size = block_size
        self.batch_size = batch_size
        self.stats = stats if stats is not None else FetchStats()
        self.retry = retry if retry is not None else RetryPolicy()
        self.cache = make_cache(cache, cache_dir=cache_dir, cache_limit=cache_limit)
        self.files = IDXFiles(
            images_url,
            labels_url,
            self.storage_options,
            retry=self.retry,
            block_size=block_size,
            stats=self.stats,
            cache=self.cache,
        )
        self.counters = StreamCounters()
        self._epoch = 0
        self._started = False

    # ------------------------------------------------------------------ size, topology and epoch

    @property
    def num_samples(self) -> int:
        """Samples in the files, from their headers (read once)."""
        return self.files.layout().count

    def prepare(self) -> None:
        """Read the headers and lay out the cache: call before DataLoader workers start, to share a memory cache."""
        self.files.prepare()

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Shard for ``rank`` of ``world_size`` (the DataModule passes the Trainer strategy's values)."""
        resolve_rank(rank, world_size)
        self._rank, self._world_size = rank, world_size

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)`` this dataset shards for."""
        return resolve_rank(self._rank, self._world_size)

    @property
    def plan_config(self) -> PlanConfig:
        """The settings that, with the topology and epoch, decide every worker's samples."""
        return dataclasses.replace(self._settings, shard_sizes=(self.num_samples,))

    def samples_per_rank(self) -> int:
        """Samples every rank yields in an epoch."""
        return samples_per_rank(self.num_samples, self.rank_and_world_size[1], self._settings.drop_last)

    def __len__(self) -> int:
        """Batches (samples, without ``batch_size``) this rank yields in an epoch: all the samples for one rank."""
        per_rank = self.samples_per_rank()
        return -(-per_rank // self.batch_size) if self.batch_size else per_rank

    @property
    def epoch(self) -> int:
        """The epoch read by the next iteration (the one in progress, during one)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration read ``epoch`` (it seeds the shuffle); without it each iteration reads the next."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch(epoch={epoch!r}) needs an integer >= 0.")
        self._epoch = epoch
        self._started = False

    def metrics(self) -> dict[str, float]:
        """Counters summed over this rank's workers: samples, remote bytes and requests, retries, cache hits."""
        return self.counters.totals()

    # ------------------------------------------------------------------ iteration

    def worker_plan(self) -> WorkerPlan:
        """The plan of the worker (or main process) calling this, for the current epoch, in the order it is read."""
        rank, world_size = self.rank_and_world_size
        num_workers, worker_id = current_worker()
        worker = plan(self.plan_config, Topology(world_size, rank, num_workers, worker_id), self._epoch)
        if self.files.sequential:
            # gzip from the remote reads forwards only: the spans in file order (the window shuffle still applies).
            spans = tuple(sorted(worker.spans))
            worker = dataclasses.replace(worker, spans=spans, span_offsets=tuple(start for _, start, _ in spans))
        return worker

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batch_size is None:
            return self._samples()
        return self._batches(self.batch_size, drop_last=False)

    def iter_batches(self, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield whole batches of this worker's share, decoded straight from the stream without per-sample work.

        Args:
            batch_size: Samples per batch.
            drop_last: Drop a final batch smaller than ``batch_size``.

        Yields:
            ``{"image": uint8 (batch, rows, cols), "label": int64 (batch,)}``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"iter_batches(batch_size={batch_size!r}) must be a positive integer.")
        return self._batches(batch_size, drop_last=drop_last)

    def _samples(self) -> Iterator[dict[str, torch.Tensor]]:
        for images, labels in self._windows():
            for image, label in zip(images, labels, strict=True):
                yield {"image": image, "label": label}

    def _batches(self, batch_size: int, *, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
        images_parts: list[torch.Tensor] = []
        labels_parts: list[torch.Tensor] = []
        held = 0
        for images, labels in self._windows():
            images_parts.append(images)
            labels_parts.append(labels)
            held += len(labels)
            if held < batch_size:
                continue
            all_images, all_labels = torch.cat(images_parts), torch.cat(labels_parts)
            full = held - held % batch_size
            for start in range(0, full, batch_size):
                yield {"image": all_images[start : start + batch_size], "label": all_labels[start : start + batch_size]}
            images_parts, labels_parts, held = [all_images[full:]], [all_labels[full:]], held - full
        if held and not drop_last:
            yield {"image": torch.cat(images_parts), "label": torch.cat(labels_parts)}

    def _windows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's samples in yield order, a window (or chunk) at a time, counted in :attr:`counters`."""
        if self._started:
            self._epoch += 1  # a second iteration without set_epoch reads the next epoch
        self._started = True
        worker = self.worker_plan()
        num_workers, worker_id = current_worker()
        slot = worker_id + 1 if num_workers else 0
        unit = worker.shuffle_window if worker.shuffle_window > 1 else self.chunk_samples
        fetched = self.stats.snapshot()
        cached = self.cache.stats() if self.cache is not None else (0, 0)
        session = self.files.session()
        try:
            for start in range(0, worker.num_samples, unit):
                images, labels = session.gather(worker.indices_between(start, start + unit))
                fetched, cached = self._count(slot, len(labels), fetched, cached)
                yield torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        finally:
            session.close()

    def _count(
        self, slot: int, samples: int, fetched: FetchStatsSnapshot, cached: tuple[int, int]
    ) -> tuple[FetchStatsSnapshot, tuple[int, int]]:
        now = self.stats.snapshot()
        self.counters.add_fetches(slot, now - fetched, samples=samples)
        return now, self.counters.add_cache(slot, self.cache, cached)

    def close(self) -> None:
        """Release the remote connections; iterating again opens new ones."""
        self.files.close()

    def __enter__(self) -> IDXDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"IDXDataset(images_url={self.images_url!r}, labels_url={self.labels_url!r}, "
            f"batch_size={self.batch_size}, shuffle={self._settings.shuffle})"
        )
