"""``StreamingDataset``: an IterableDataset over sharded data at any fsspec URL.

Each DataLoader worker of each rank computes its own plan (see
:mod:`lightning_patterns.data.sharding.assignment`): contiguous spans of few shards, the same number
of batches on every rank. Shards are fetched ahead in background threads, verified against the
manifest's checksums, decoded a whole batch at a time, and dropped once used, so memory does not grow
with the dataset. The dataset is ``Stateful``: a ``StatefulDataLoader`` saves and restores its position
exactly, and :class:`~lightning_patterns.data.streaming.loader.StreamingDataLoader` also resumes on
another world size or number of workers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from lightning_patterns.data.batching import ClassBalancer
from lightning_patterns.data.caching import CacheConfig, EpochCache, make_cache
from lightning_patterns.data.remote import Deadline, RemoteReader, RetryPolicy
from lightning_patterns.data.sharding.assignment import (
    PlanConfig,
    Span,
    WorkerPlan,
    check_class_coverage,
    plan,
    samples_per_rank,
)
from lightning_patterns.data.sharding.topology import Topology
from lightning_patterns.data.shards.blocks import merge_ranges
from lightning_patterns.data.shards.manifest import Manifest, open_shard, read_manifest, shard_url
from lightning_patterns.data.shards.reader import ShardReader, read_column
from lightning_patterns.data.streaming.batches import BatchPositions, PlanIndices, ShardUse, shard_use_of
from lightning_patterns.data.streaming.class_order import ClassOrder, recorded_histograms
from lightning_patterns.data.streaming.cursor import StreamCursor
from lightning_patterns.data.streaming.fetcher import PriorityPool, ShardFetcher
from lightning_patterns.data.streaming.gather import gather_indices, gather_runs, run_batches
from lightning_patterns.data.streaming.metrics import StreamCounters, StreamRecorder
from lightning_patterns.data.streaming.options import ClassBalance, ReadAhead
from lightning_patterns.data.streaming.pipeline import ReadAheadPipeline
from lightning_patterns.data.streaming.random_access import SampleReader
from lightning_patterns.data.streaming.resume import (
    ResumePoint,
    delivered,
    remaining_stream,
    spans_from_state,
    spans_to_state,
)
from lightning_patterns.data.streaming.topology import current_worker, resolve_rank

__all__ = ["StreamingDataset"]

log = logging.getLogger(__name__)

# Rows decoded at a time when the dataset yields single samples.
_SAMPLE_CHUNK = 256


class StreamingDataset(IterableDataset[dict[str, Any]]):
    """Streams the shards written by :func:`~lightning_patterns.data.shards.write_dataset` from ``url``.

    Use it with ``DataLoader(dataset, batch_size=None)`` when ``batch_size`` is set here (whole batches
    are decoded at once, the fast path), or with a DataLoader ``batch_size`` when it is ``None``.

    Where the next iteration begins is one :class:`~lightning_patterns.data.streaming.cursor.StreamCursor`, set
    by :meth:`reset` (``set_epoch`` and ``load_state_dict`` call it) and saved by :meth:`state_dict`.
    An iteration that starts without a ``reset`` since the last one reads the following epoch.

    Args:
        url: the dataset root (holding ``manifest.json``): a local path or any fsspec URL.
        batch_size: samples per yielded batch; ``None`` yields single samples.
        shuffle: shuffle span order every epoch, then samples within windows of ``shuffle_window``.
        seed: shuffle seed shared by every rank (``>= 0``).
        drop_last: drop up to ``world_size - 1`` samples per epoch instead of repeating as many, so
            every rank gets the same number of samples.
        shuffle_window: samples per window of the within-worker shuffle (a bounded shuffle buffer).
        span_samples: split shards into spans of at most this many samples before shuffling span order.
        storage_options: passed unchanged to fsspec (an S3 ``endpoint_url`` goes in ``client_kwargs``).
        verify_checksums: check every shard against the manifest's checksum.
        rank: this process's rank; by default from the Trainer (via the DataModule), torch.distributed or
            the ``RANK`` environment variable.
        world_size: number of ranks, given together with ``rank``.
        read_ahead: how many shards (and bytes) to fetch ahead, with how many threads, and how long one shard may
            take (default: ``ReadAhead()``).
        retry: retry policy for transient remote faults (default: ``RetryPolicy()``).
        cache: keep shards for later epochs: ``"memory"``, ``"disk"`` (needs ``cache_dir``), a
            :class:`~lightning_patterns.data.caching.CacheConfig`, an
            :class:`~lightning_patterns.data.caching.EpochCache`, or ``None`` (every epoch reads the remote).
        cache_dir: folder of the disk cache, with ``cache="disk"``; ranks and workers on one machine may share it.
        cache_limit: bytes the cache may hold, with a cache name (``None``: as much as the dataset).
        min_per_class: make every batch hold at least this many samples of each class (needs ``batch_size``):
            short for ``class_balance=ClassBalance(min_per_class)``. Every DataLoader worker of every rank then
            gets enough samples of each class (the plan spreads the classes over the ranks when the shards are
            split by label), or the dataset (or its loader, for ``num_workers``) fails at construction naming the
            ranks, workers and classes that fall short (a :class:`~lightning_patterns.exceptions.ClassCoverageError`).
        class_balance: class-balanced batches with all their settings (label field, number of classes,
            look-ahead); give it or ``min_per_class``, not both.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_window: int = 1024,
        span_samples: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        verify_checksums: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        read_ahead: ReadAhead | None = None,
        retry: RetryPolicy | None = None,
        cache: str | CacheConfig | EpochCache | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        min_per_class: int | None = None,
        class_balance: ClassBalance | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1 (or None), got batch_size={batch_size!r}.")
        # Checked before the manifest is read; the shard sizes come with it.
        settings = PlanConfig((), batch_size or 1, seed, shuffle, drop_last, shuffle_window, span_samples)
        self.class_balance = _class_balance(min_per_class, class_balance)
        self._label_field = "label" if self.class_balance is None else self.class_balance.label_field
        resolve_rank(rank, world_size)  # validate now, so a bad rank fails at construction
        self._rank, self._world_size = rank, world_size
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.read_ahead = read_ahead or ReadAhead()
        self.verify_checksums = verify_checksums
        self._reader = RemoteReader(self.url, self.storage_options, retry=retry)
        self.manifest: Manifest = self._read_manifest()
        self._shard_class_counts: np.ndarray | None = None
        self._plan_config = replace(settings, shard_sizes=[shard.num_samples for shard in self.manifest.shards])
        self._offsets = np.concatenate([[0], np.cumsum(self._plan_config.shard_sizes)]).astype(np.int64)
        self._num_workers_hint = 0
        self._balancer = self._make_balancer()
        self.cache = make_cache(cache, cache_dir=cache_dir, cache_limit=cache_limit)
        if self.cache is not None:
            self.cache.bind(self.manifest)
        self.counters = StreamCounters()
        # The recorder of an iteration running in this process. Lightning stops asking for batches once it has
        # ``len(loader)`` of them, leaving the generator (and its final flush) suspended: ``metrics()`` flushes it.
        self._recorder: StreamRecorder | None = None
        self._cursor = StreamCursor()
        # Units yielded since an iteration began from the cursor; None until one begins.
        self._yielded: int | None = None
        self._samples: SampleReader | None = None

    def _read_manifest(self) -> Manifest:
        # Through the reader, so a transient fault on the manifest is retried like one on a shard; bounded in
        # bytes (the default cap) and in time, like every shard read.
        return read_manifest(self._reader, deadline=Deadline(self.read_ahead.timeout))

    def _make_balancer(self) -> ClassBalancer | None:
        balance = self.class_balance
        if balance is None:
            return None
        if self.batch_size is None:
            raise ValueError(
                f"min_per_class={balance.min_per_class} balances whole batches: construct the dataset with "
                "`batch_size=N`."
            )
        if balance.label_field not in self.manifest.schema:
            raise ValueError(
                f"min_per_class needs the label field {balance.label_field!r}, but the dataset's fields are "
                f"{sorted(self.manifest.schema)}: pass `ClassBalance(label_field=...)` naming the field with class "
                "labels."
            )
        histograms = self.shard_class_counts()
        classes = balance.num_classes if balance.num_classes is not None else histograms.shape[1]
        balancer = ClassBalancer(self.batch_size, balance.min_per_class, classes, lookahead=balance.lookahead)
        histograms = np.pad(histograms, ((0, 0), (0, max(0, classes - histograms.shape[1]))))
        # The plan spreads the classes over every rank and worker (see "Class coverage" in the assignment module),
        # and checks up front that each gets enough of every class.
        self._plan_config = replace(
            self._plan_config, class_counts=histograms.tolist(), min_per_class=balance.min_per_class
        )
        self._check_class_coverage()
        return balancer

    def _check_class_coverage(self) -> None:
        check_class_coverage(
            self._plan_config, world_size=self.rank_and_world_size[1], num_workers=self._num_workers_hint
        )

    @property
    def min_per_class(self) -> int | None:
        """Samples of each class per batch when balancing, else ``None``."""
        return None if self.class_balance is None else self.class_balance.min_per_class

    def class_counts(self) -> np.ndarray:
        """Samples per class over the whole dataset (see :meth:`shard_class_counts`)."""
        totals: np.ndarray = self.shard_class_counts().sum(axis=0)
        return totals

    def shard_class_counts(self) -> np.ndarray:
        """Samples per class of each shard, ``[shard, class]``: the manifest's ``label_counts`` where recorded.

        Shards without recorded counts have their label column read (two range reads per shard, the rest of the
        shard untouched), once: the result is kept.
        """
        if self._shard_class_counts is not None:
            return self._shard_class_counts
        label_field = self._label_field
        rows: list[np.ndarray] = []
        for shard, recorded in zip(self.manifest.shards, recorded_histograms(self.manifest, label_field), strict=True):
            if recorded is not None:
                rows.append(np.asarray(recorded, dtype=np.int64))
                continue
            labels = read_column(
                functools.partial(self._reader.read_range, shard.path, deadline=Deadline(self.read_ahead.timeout)),
                label_field,
                size=shard.num_bytes,
                schema=self.manifest.schema,
                url=shard_url(self.url, shard.path),
                num_samples=shard.num_samples,
            )
            if labels.size and int(labels.min()) < 0:
                raise ValueError(
                    f"Class labels must be >= 0, but {shard_url(self.url, shard.path)} holds {int(labels.min())} in "
                    f"{label_field!r}: map the labels to 0 .. num_classes - 1 before writing."
                )
            rows.append(np.bincount(labels.reshape(-1).astype(np.int64)))
        width = max((row.size for row in rows), default=0)
        table = np.zeros((len(rows), width), dtype=np.int64)
        for s, row in enumerate(rows):
            table[s, : row.size] = row
        self._shard_class_counts = table
        return table

    # ------------------------------------------------------------------ topology and planning

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Shard for ``rank`` of ``world_size`` (the DataModule passes the Trainer strategy's values)."""
        resolve_rank(rank, world_size)
        self._rank, self._world_size = rank, world_size
        if self._balancer is not None:
            self._check_class_coverage()

    def set_num_workers(self, num_workers: int) -> None:
        """Tell the dataset the DataLoader's ``num_workers`` (for :meth:`state_dict`, and the class coverage check).

        Raises:
            ClassCoverageError: with class balancing, if some worker would get too few samples of some class.
        """
        self._num_workers_hint = num_workers
        if self._balancer is not None:
            self._check_class_coverage()

    def set_batch_size(self, batch_size: int) -> None:
        """Yield batches of ``batch_size`` from the next iteration on (the loader re-plans what remains of an epoch).

        Raises:
            ValueError: ``batch_size < 1``, a dataset that yields single samples, or class-balanced batches (their
                balancer and replayed resume are built for one batch size).
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if self.batch_size is None:
            raise ValueError(
                "This StreamingDataset yields single samples (batch_size=None), so it has no batch size to change: "
                "construct it with `batch_size=N`, or change the DataLoader's batch size instead."
            )
        if batch_size == self.batch_size:
            return
        if self._balancer is not None:
            raise ValueError(
                f"Class-balanced batches (min_per_class={self.min_per_class}) keep the batch size they were built "
                f"with ({self.batch_size}), got batch_size={batch_size!r}. Drop `min_per_class`/`class_balance` to "
                "change the batch size while training."
            )
        self.batch_size = batch_size
        self._plan_config = replace(self._plan_config, batch_size=batch_size)

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)`` this dataset shards for."""
        return resolve_rank(self._rank, self._world_size)

    @property
    def plan_config(self) -> PlanConfig:
        """The settings that, with the topology and epoch, decide every worker's samples."""
        return self._plan_config

    def topology(self) -> Topology:
        """The topology of the worker (or main process) calling this."""
        rank, world_size = self.rank_and_world_size
        num_workers, worker_id = current_worker()
        return Topology(world_size, rank, num_workers, worker_id)

    def samples_per_rank(self) -> int:
        """Samples every rank yields in a full epoch."""
        return samples_per_rank(self.manifest.num_samples, self.rank_and_world_size[1], self._plan_config.drop_last)

    def __len__(self) -> int:
        """Batches (or samples, when ``batch_size`` is ``None``) per rank in a full epoch, whatever ``num_workers``."""
        return self.batches_in(None)

    def batches_in(self, stream: Sequence[Span] | None) -> int:
        """Batches (units) each rank yields over ``stream`` (``None``: a whole epoch)."""
        total = self.manifest.num_samples if stream is None else sum(stop - start for _, start, stop in stream)
        per_rank = samples_per_rank(total, self.rank_and_world_size[1], self._plan_config.drop_last)
        return -(-per_rank // self.batch_size) if self.batch_size else per_rank

    # ------------------------------------------------------------------ the cursor: one way in, one way out

    @property
    def epoch(self) -> int:
        """The epoch being read, or to be read by the next iteration."""
        return self._cursor.epoch

    @property
    def cursor(self) -> StreamCursor:
        """Where the current (or next) iteration begins."""
        return self._cursor

    def reset(self, state: StreamCursor | Mapping[str, Any] | None = None) -> None:
        """Set where the next iteration begins: the one way in.

        Args:
            state: ``None`` starts the current epoch afresh; a :class:`StreamCursor` is taken as it is
                (``StreamCursor(epoch=3)`` starts epoch 3); a mapping is a :meth:`state_dict` taken on this
                topology, and the iteration continues exactly where it was taken.

        Raises:
            ValueError: a state taken with other dataset settings or on another topology (resume those through
                :class:`~lightning_patterns.data.streaming.loader.StreamingDataLoader`).
        """
        if state is None:
            state = StreamCursor(self._cursor.epoch)
        elif not isinstance(state, StreamCursor):
            state = self._cursor_of(state)
        self._cursor = state
        self._yielded = None

    def state_dict(self) -> dict[str, Any]:
        """This worker's position, the one way out: epoch and units yielded, with the plan that gives them meaning."""
        num_workers, worker_id = current_worker()
        return {
            "epoch": self._cursor.epoch,
            "units_yielded": self._cursor.delivered_by(worker_id) + (self._yielded or 0),
            "worker_id": worker_id,
            "num_workers": num_workers,
            "world_size": self.rank_and_world_size[1],
            "config": self._plan_config.to_state(),
            "stream": spans_to_state(self._cursor.stream),
        }

    def _cursor_of(self, state: Mapping[str, Any]) -> StreamCursor:
        """The cursor of a :meth:`state_dict`, once it is known to fit this dataset and topology."""
        num_workers, worker_id = current_worker()
        if PlanConfig.from_state(state["config"]) != self._plan_config:
            raise ValueError(
                "The saved streaming state was taken with other dataset settings (batch size, seed, shuffle, "
                "drop_last, window or shards differ). Construct the dataset with the settings of the saved run, or "
                "start the epoch afresh."
            )
        if state["world_size"] != self.rank_and_world_size[1] or state["num_workers"] != num_workers:
            raise ValueError(
                f"The saved state is per worker for world_size={state['world_size']}, num_workers="
                f"{state['num_workers']}, but this run has world_size={self.rank_and_world_size[1]}, "
                f"num_workers={num_workers}. Resume through StreamingDataLoader, which re-plans the rest of the "
                "epoch for the new topology."
            )
        delivered = (0,) * worker_id + (int(state["units_yielded"]),)
        return StreamCursor(int(state["epoch"]), spans_from_state(state.get("stream")), delivered)

    def cursor_at(self, point: ResumePoint, stream: Sequence[Span] | None = None) -> StreamCursor:
        """The cursor that finishes the epoch of ``point`` on this topology, each remaining sample once.

        Args:
            point: where every rank stood.
            stream: ``remaining_stream(point)`` if the caller has computed it already.

        Raises:
            ValueError: ``point`` was saved with other dataset settings, or (for class-balanced batches, which
                resume by replaying their plan) on another topology.
        """
        if point.config != self._plan_config:
            raise ValueError(
                "The resume point was saved with other dataset settings (batch size, seed, shuffle, drop_last, window "
                "or shards differ): construct the dataset with the settings of the saved run."
            )
        if self._balancer is None:
            return StreamCursor(point.epoch, tuple(remaining_stream(point) if stream is None else stream))
        # Balanced batches regroup samples across a look-ahead, so what was consumed is known only by replaying
        # the same plan: possible on the same topology, where each worker skips the batches it delivered.
        rank, world_size = self.rank_and_world_size
        if point.world_size != world_size or point.num_workers != self._num_workers_hint or point.stream is not None:
            raise ValueError(
                f"Resuming class-balanced batches (min_per_class={self.min_per_class}) needs the topology that saved "
                f"the state: world_size={point.world_size}, num_workers={point.num_workers} (this run has "
                f"world_size={world_size}, num_workers={self._num_workers_hint}). Resume on that topology, or start "
                "the epoch afresh."
            )
        return StreamCursor(point.epoch, delivered=tuple(batches for _, batches in delivered(point, rank)))

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (reseeds the shuffle)."""
        self.reset(StreamCursor(epoch))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken, on the same topology (``StatefulDataLoader`` calls it).

        To resume on another world size or number of workers, ``reset(cursor_at(point))`` (the
        :class:`~lightning_patterns.data.streaming.loader.StreamingDataLoader` does it for you).
        """
        self.reset(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        if self._yielded is not None:
            # An iteration already began from this cursor: this one reads the following epoch.
            self.reset(self._cursor.next_epoch())
        cursor = self._cursor
        topology = self.topology()
        worker_plan = plan(self._plan_config, topology, cursor.epoch, cursor.stream)
        self._yielded = 0
        slot = topology.worker_id + 1 if topology.num_workers else 0
        return self._generate(worker_plan, cursor, cursor.delivered_by(topology.worker_id), slot, started)

    # ------------------------------------------------------------------ random access

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` of the whole dataset (manifest order, ``0 <= index < manifest.num_samples``).

        Only the blocks that hold the sample are fetched (the shard's head once, then one block or two per
        field), each verified against the shard's block table; shards written without a block table are
        fetched whole (and the last one kept). Independent of the rank, the epoch and the cache.

        Raises:
            IndexError: ``index`` is out of range.
        """
        return self.sample_reader.read(index)

    @property
    def sample_reader(self) -> SampleReader:
        """The random-access reader behind ``dataset[i]``; ``sample_reader.as_map_dataset()`` is a map-style view."""
        if self._samples is None:
            self._samples = SampleReader(self._reader, self.manifest, verify=self.verify_checksums)
        return self._samples

    # ------------------------------------------------------------------ reading

    def _describe(self, shard: int) -> str:
        return shard_url(self.url, self.manifest.shards[shard].path)

    def _worker_rows(self, worker_plan: WorkerPlan) -> dict[int, list[tuple[int, int]]]:
        """Per shard, the rows this worker reads of it (merged ranges)."""
        rows: dict[int, list[tuple[int, int]]] = {}
        for shard, start, stop in worker_plan.spans:
            rows.setdefault(shard, []).append((start, stop))
        return {shard: merge_ranges(ranges) for shard, ranges in rows.items()}

    def _partial_rows(self, worker_plan: WorkerPlan) -> dict[int, list[tuple[int, int]]]:
        """The shards this worker reads only part of, and can (a block table, no cache): only those rows are fetched.

        With a cache the whole shard is fetched (once per rank, or machine) to be kept for later epochs.
        """
        if self.cache is not None or worker_plan.class_sorted:  # class-sorted spans count positions, not rows
            return {}
        shards = self.manifest.shards
        return {
            shard: ranges
            for shard, ranges in self._worker_rows(worker_plan).items()
            if shards[shard].has_blocks and ranges != [(0, shards[shard].num_samples)]
        }

    def _loader(
        self, fetcher: ShardFetcher, partial: dict[int, list[tuple[int, int]]], on_wait: Callable[[float], None]
    ) -> Any:
        """The pipeline's ``load(shard, deadline, priority)``: a part of the shard, the cache, or the whole shard.

        A shard with a block table is opened while it arrives, with a cache or without: its first batch waits for
        its own rows only (``on_wait`` is told how long reads wait for the rest).
        """
        shards, schema = self.manifest.shards, self.manifest.schema

        def load(shard: int, deadline: Deadline, priority: int) -> ShardReader:
            rows = partial.get(shard)
            if rows is not None:
                return fetcher.fetch_rows(shard, rows, priority, deadline, None)
            if shards[shard].has_blocks:
                if self.cache is None:
                    return fetcher.open_arriving(shard, priority, deadline, on_wait)
                # A cached shard is read while it arrives too; the cache keeps it once every byte is verified.
                found = self.cache.get_or_stream(
                    shard,
                    lambda into, complete: fetcher.open_arriving(shard, priority, deadline, on_wait, into, complete),
                )
                if isinstance(found, ShardReader):
                    return found
                return open_shard(found, shards[shard], schema, self._describe(shard))
            if self.cache is None:
                data: Any = fetcher.fetch_whole(shard, None, priority, deadline)
            else:
                data = self.cache.get_or_fill(shard, lambda into: fetcher.fetch_whole(shard, into, priority, deadline))
            # The header is checked against the manifest entry before any sample of the shard is decoded.
            return open_shard(data, shards[shard], schema, self._describe(shard))

        return load

    def _generate(
        self, worker_plan: WorkerPlan, cursor: StreamCursor, skip_units: int, slot: int, started: float
    ) -> Iterator[dict[str, Any]]:
        if worker_plan.num_samples == 0:
            return
        indices = PlanIndices(worker_plan)
        unit = self.batch_size or 1
        positions = BatchPositions(
            worker_plan.num_samples,
            self.batch_size or _SAMPLE_CHUNK,
            first_position=skip_units * unit,
            skip_batches=skip_units,
            balancer=self._balancer,
        )
        balanced = self._balancer is not None
        pending, last_position, schedule = shard_use_of(
            worker_plan, len(self.manifest.shards), self._offsets, positions.first_needed
        )
        # The counters' baseline is taken before the read-ahead threads start, so their first fetches are counted.
        arriving_waits: list[float] = []  # seconds reads waited for shards still arriving
        recorder = StreamRecorder(
            self.counters,
            slot,
            self._reader.stats.snapshot,
            lambda: pipeline.wait_seconds + sum(arriving_waits),
            None if self.cache is None else self.cache.stats,
        )
        read_ahead = self.read_ahead
        partial = self._partial_rows(worker_plan)
        infos = self.manifest.shards
        load_bytes = [info.num_bytes for info in infos]
        for shard, ranges in partial.items():
            rows = sum(stop - start for start, stop in ranges)
            load_bytes[shard] = -(-infos[shard].num_bytes * rows // max(infos[shard].num_samples, 1))
        pool = PriorityPool(read_ahead.threads)
        fetcher = ShardFetcher(
            self._reader, self.manifest, pool, chunk_bytes=self._reader.chunk_size, verify=self.verify_checksums
        )
        pipeline = ReadAheadPipeline(
            schedule,
            load_bytes,
            self._loader(fetcher, partial, arriving_waits.append),
            max_bytes=read_ahead.max_bytes,
            max_shards=read_ahead.shards,
            loaders=read_ahead.threads + 1,
            timeout=read_ahead.timeout,
            describe=self._describe,
            on_close=pool.shutdown,
        )
        class_order = self._class_order() if worker_plan.class_sorted else None

        def release(shard: int) -> None:
            pipeline.release(shard)
            if class_order is not None:
                class_order.forget(shard)

        self._recorder = recorder
        use = ShardUse(pending, last_position, balanced, release)
        if self._balancer is None and worker_plan.shuffle_window <= 1 and class_order is None:
            batches = self._run_batches(worker_plan, positions, pipeline, use)
        else:
            batches = self._index_batches(indices, positions, pipeline, use, class_order)
        first = True
        try:
            for batch, size in batches:
                if first:
                    first = False
                    self.counters.set_first_batch(slot, time.perf_counter() - started)
                recorder.add(size)
                if self.batch_size:
                    self._count_yielded(cursor)
                    yield batch
                else:
                    for row in range(size):
                        self._count_yielded(cursor)
                        yield {name: value[row] for name, value in batch.items()}
        finally:
            recorder.flush()
            if self._recorder is recorder:
                self._recorder = None
            pipeline.close()

    def _class_order(self) -> ClassOrder:
        histograms = self._plan_config.class_counts
        assert histograms is not None  # a class-sorted plan is made from them
        return ClassOrder(self._label_field, histograms, self._describe)

    def _run_batches(
        self, worker_plan: WorkerPlan, positions: BatchPositions, pipeline: ReadAheadPipeline, use: ShardUse
    ) -> Iterator[tuple[dict[str, Any], int]]:
        """``(batch, size)`` of an unshuffled plan: each batch one slice per field (two where it crosses shards)."""
        get, gathered = pipeline.get, use.gathered_rows
        for runs in run_batches(worker_plan, positions.step, positions.first_position):
            batch = gather_runs(get, runs)
            size = 0
            for shard, start, stop in runs:
                gathered(shard, stop - start)
                size += stop - start
            yield batch, size

    def _index_batches(
        self,
        indices: PlanIndices,
        positions: BatchPositions,
        pipeline: ReadAheadPipeline,
        use: ShardUse,
        class_order: ClassOrder | None,
    ) -> Iterator[tuple[dict[str, Any], int]]:
        """``(batch, size)`` of any plan (a window shuffle, class balancing), through per-sample indices."""

        def locate(global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            shards, local = self._locate(global_indices)
            if class_order is not None:  # the plan counts positions in each shard's class order
                local = class_order.file_positions(pipeline.get, shards, local)
            return shards, local

        def read_labels(begin: int, end: int) -> np.ndarray:
            return self._read_labels(pipeline, *locate(indices.between(begin, end)))

        for batch_positions, skipped in positions.batches(read_labels, use.labels_read):
            shards, local = locate(indices.at(batch_positions))
            if not skipped:
                batch = gather_indices(pipeline.get, shards, local)
            use.gathered(shards)
            if not skipped:
                yield batch, batch_positions.size

    def _count_yielded(self, cursor: StreamCursor) -> None:
        # Only the iteration that began from the current cursor moves it on; one abandoned before a reset does not.
        if self._cursor is cursor and self._yielded is not None:
            self._yielded += 1

    def _locate(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, index within the shard)`` of global sample indices."""
        shards = np.searchsorted(self._offsets, global_indices, side="right") - 1
        return shards, global_indices - self._offsets[shards]

    def _read_labels(self, pipeline: ReadAheadPipeline, shards: np.ndarray, local: np.ndarray) -> np.ndarray:
        labels = np.empty(shards.size, dtype=np.int64)
        for shard in np.unique(shards).tolist():
            mask = shards == shard
            labels[mask] = pipeline.get(shard).read_field(self._label_field, local[mask]).reshape(-1)
        return labels

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the dataset without this process's iteration (its recorder holds closures).
        return {**self.__dict__, "_recorder": None}

    def metrics(self) -> dict[str, float]:
        """Counters summed over this rank's workers: samples, remote bytes and requests, retries, waits.

        ``first_batch_seconds`` is the time from the start of the latest iteration to its first batch (the
        slowest worker's, each counted from when it started iterating).
        """
        recorder = self._recorder
        if recorder is not None:
            recorder.flush()
        return self.counters.totals()

    def __repr__(self) -> str:
        return (
            f"StreamingDataset(url={self.url!r}, samples={self.manifest.num_samples}, "
            f"shards={len(self.manifest.shards)}, batch_size={self.batch_size}, shuffle={self._plan_config.shuffle})"
        )


def _class_balance(min_per_class: int | None, class_balance: ClassBalance | None) -> ClassBalance | None:
    """The class balance asked for: ``min_per_class`` is short for ``ClassBalance(min_per_class)``."""
    if min_per_class is None:
        return class_balance
    if class_balance is not None:
        raise ValueError(
            f"Both min_per_class={min_per_class!r} and class_balance={class_balance!r} were given: set "
            "`ClassBalance(min_per_class=...)` alone, or `min_per_class` alone for the default label field."
        )
    return ClassBalance(min_per_class)
