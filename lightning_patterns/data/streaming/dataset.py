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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lightning_patterns.data.batching import ClassBalancer, check_class_counts
from lightning_patterns.data.caching import EpochCache, make_cache
from lightning_patterns.data.remote import Deadline, FetchStatsSnapshot, RemoteReader, RetryPolicy
from lightning_patterns.data.sharding.assignment import Span, WorkerPlan, samples_per_rank
from lightning_patterns.data.shards.manifest import Manifest, fetch_shard, open_shard, read_manifest, shard_url
from lightning_patterns.data.shards.reader import ShardReader, read_column
from lightning_patterns.data.streaming.batches import BatchPositions, PlanIndices, ShardUse, only_shard, shard_use_of
from lightning_patterns.data.streaming.metrics import StreamCounters
from lightning_patterns.data.streaming.pipeline import ReadAhead
from lightning_patterns.data.streaming.resume import (
    PlanConfig,
    ResumePoint,
    delivered,
    plan_for,
    remaining_stream,
    spans_from_state,
    spans_to_state,
)
from lightning_patterns.data.streaming.topology import Topology, current_worker, resolve_rank

__all__ = ["StreamingDataset"]

log = logging.getLogger(__name__)

# Rows decoded at a time when the dataset yields single samples.
_SAMPLE_CHUNK = 256


class StreamingDataset(IterableDataset[dict[str, Any]]):
    """Streams the shards written by :func:`~lightning_patterns.data.shards.write_dataset` from ``url``.

    Use it with ``DataLoader(dataset, batch_size=None)`` when ``batch_size`` is set here (whole batches
    are decoded at once, the fast path), or with a DataLoader ``batch_size`` when it is ``None``.

    Args:
        url: the dataset root (holding ``manifest.json``): a local path or any fsspec URL.
        batch_size: samples per yielded batch; ``None`` yields single samples.
        shuffle: shuffle span order every epoch, then samples within windows of ``shuffle_window``.
        seed: shuffle seed shared by every rank (``>= 0``).
        drop_last: drop up to ``world_size - 1`` samples per epoch instead of repeating as many, so
            every rank gets the same number of samples.
        shuffle_window: samples per window of the within-worker shuffle (a bounded shuffle buffer).
        span_samples: split shards into spans of at most this many samples before shuffling span order.
        read_ahead: shards to fetch ahead of the one in use.
        read_ahead_bytes: bytes to fetch ahead at most (``None``: only ``read_ahead`` bounds it).
        read_threads: background threads that fetch shards.
        fetch_timeout: seconds one read may take, retries included, before failing: the manifest, each shard
            (its download is cancelled then, so no thread outlives it), and the wait for a shard in use.
        storage_options: passed unchanged to fsspec (an S3 ``endpoint_url`` goes in ``client_kwargs``).
        retry: retry policy for transient remote faults.
        verify_checksums: check every shard against the manifest's checksum.
        rank: this process's rank; by default from the Trainer (via the DataModule), torch.distributed or
            the ``RANK`` environment variable.
        world_size: number of ranks, given together with ``rank``.
        cache: keep shards for later epochs: ``"memory"``, ``"disk"`` (needs ``cache_dir``), an
            :class:`~lightning_patterns.data.caching.EpochCache`, or ``None`` (every epoch reads the remote).
        cache_dir: folder of the disk cache; ranks and workers on one machine may share it.
        cache_limit: bytes the cache may hold (``None``: as much as the dataset).
        min_per_class: make every batch hold at least this many samples of each class (needs ``batch_size``).
            Each sample is still yielded once per epoch; a batch may fall short only in a documented tail
            (a class running out near the end of a worker's samples, see
            :class:`~lightning_patterns.data.batching.ClassBalancer`).
        label_field: the field holding integer class labels ``0 .. num_classes - 1``.
        num_classes: number of classes (default: read from the label column of every shard).
        balance_lookahead: samples beyond a batch that class balancing may draw from.
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
        read_ahead: int = 2,
        read_ahead_bytes: int | None = 256 * 2**20,
        read_threads: int = 4,
        fetch_timeout: float = 600.0,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        verify_checksums: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        cache: str | EpochCache | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        min_per_class: int | None = None,
        label_field: str = "label",
        num_classes: int | None = None,
        balance_lookahead: int = 4096,
    ) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size, read_threads=read_threads, span_samples=span_samples)
        _check_non_negative(seed=seed, shuffle_window=shuffle_window, read_ahead=read_ahead)
        if fetch_timeout <= 0:
            raise ValueError(f"`fetch_timeout` must be positive, got fetch_timeout={fetch_timeout!r}.")
        if read_ahead_bytes is not None and read_ahead_bytes < 1:
            raise ValueError(f"`read_ahead_bytes` must be positive or None, got read_ahead_bytes={read_ahead_bytes!r}.")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_window = shuffle_window
        self.span_samples = span_samples
        self.read_ahead = read_ahead
        self.read_ahead_bytes = read_ahead_bytes
        self.read_threads = read_threads
        self.fetch_timeout = fetch_timeout
        self.verify_checksums = verify_checksums
        self._reader = RemoteReader(self.url, self.storage_options, retry=retry)
        self.manifest: Manifest = self._read_manifest()
        resolve_rank(rank, world_size)  # validate now, so a bad rank fails at construction
        self._rank, self._world_size = rank, world_size
        self._offsets = np.concatenate([[0], np.cumsum([s.num_samples for s in self.manifest.shards])]).astype(np.int64)
        self.label_field = label_field
        self.min_per_class = min_per_class
        self._balancer = self._make_balancer(min_per_class, num_classes, balance_lookahead)
        self._resume_skip: ResumePoint | None = None
        self.cache = make_cache(cache, cache_dir=cache_dir, cache_limit=cache_limit)
        if self.cache is not None:
            self.cache.bind(self.manifest)
        self.counters = StreamCounters()
        self.epoch = 0
        self._num_workers_hint = 0
        # Where the next iteration starts: a fresh epoch, or a point inside one (set by load_state_dict/resume).
        self._resume_units = 0
        self._resume_stream: tuple[Span, ...] | None = None
        self._resume_pending = False
        self._iterated = False
        self._units_yielded = 0
        self._current_stream: tuple[Span, ...] | None = None

    def _read_manifest(self) -> Manifest:
        # Through the reader, so a transient fault on the manifest is retried like one on a shard; bounded in
        # bytes (the default cap) and in time, like every shard read.
        return read_manifest(self._reader, deadline=Deadline(self.fetch_timeout))

    def _make_balancer(
        self, min_per_class: int | None, num_classes: int | None, lookahead: int
    ) -> ClassBalancer | None:
        if min_per_class is None:
            return None
        if self.batch_size is None:
            raise ValueError(
                f"min_per_class={min_per_class} balances whole batches: construct the dataset with `batch_size=N`."
            )
        if self.label_field not in self.manifest.schema:
            raise ValueError(
                f"min_per_class needs the label field {self.label_field!r}, but the dataset's fields are "
                f"{sorted(self.manifest.schema)}: pass `label_field=` naming the field with class labels."
            )
        counts = self.class_counts()
        classes = num_classes if num_classes is not None else len(counts)
        balancer = ClassBalancer(self.batch_size, min_per_class, classes, lookahead=lookahead)
        world_size = self.rank_and_world_size[1]
        check_class_counts(
            np.pad(counts, (0, max(0, classes - len(counts)))),
            num_batches=world_size * len(self),
            min_per_class=min_per_class,
        )
        return balancer

    def class_counts(self) -> np.ndarray:
        """Samples per class over the whole dataset, from the label column alone (two range reads per shard)."""
        total = np.zeros(0, dtype=np.int64)
        for shard in self.manifest.shards:
            labels = read_column(
                functools.partial(self._reader.read_range, shard.path, deadline=Deadline(self.fetch_timeout)),
                self.label_field,
                size=shard.num_bytes,
                schema=self.manifest.schema,
                url=shard_url(self.url, shard.path),
                num_samples=shard.num_samples,
            )
            if labels.size and int(labels.min()) < 0:
                raise ValueError(
                    f"Class labels must be >= 0, but {shard_url(self.url, shard.path)} holds {int(labels.min())} in "
                    f"{self.label_field!r}: map the labels to 0 .. num_classes - 1 before writing."
                )
            counts = np.bincount(labels.reshape(-1).astype(np.int64))
            if counts.size > total.size:
                total = np.pad(total, (0, counts.size - total.size))
            total[: counts.size] += counts
        return total

    # ------------------------------------------------------------------ topology and planning

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Shard for ``rank`` of ``world_size`` (the DataModule passes the Trainer strategy's values)."""
        resolve_rank(rank, world_size)
        self._rank, self._world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (reseeds the shuffle)."""
        if epoch < 0:
            raise ValueError(f"`epoch` must be >= 0, got epoch={epoch!r}.")
        self.epoch = epoch
        self._resume_pending = False
        self._iterated = False

    def set_num_workers(self, num_workers: int) -> None:
        """Tell the dataset the DataLoader's ``num_workers`` (for :meth:`state_dict` in the main process)."""
        self._num_workers_hint = num_workers

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)`` this dataset shards for."""
        return resolve_rank(self._rank, self._world_size)

    @property
    def plan_config(self) -> PlanConfig:
        """The settings that, with the topology and epoch, decide every worker's samples."""
        return PlanConfig(
            shard_sizes=tuple(shard.num_samples for shard in self.manifest.shards),
            batch_size=self.batch_size or 1,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            shuffle_window=self.shuffle_window,
            span_samples=self.span_samples,
        )

    def topology(self) -> Topology:
        """The topology of the worker (or main process) calling this."""
        rank, world_size = self.rank_and_world_size
        num_workers, worker_id = current_worker()
        return Topology(world_size, rank, num_workers, worker_id)

    def samples_per_rank(self) -> int:
        """Samples every rank yields in a full epoch."""
        return samples_per_rank(self.manifest.num_samples, self.rank_and_world_size[1], self.drop_last)

    def __len__(self) -> int:
        """Batches (or samples, when ``batch_size`` is ``None``) per rank in a full epoch, whatever ``num_workers``."""
        return self.batches_in(None)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """This worker's position: epoch and units yielded, with the plan that gives them meaning."""
        num_workers, worker_id = current_worker()
        return {
            "epoch": self.epoch,
            "units_yielded": self._units_yielded,
            "worker_id": worker_id,
            "num_workers": num_workers,
            "world_size": self.rank_and_world_size[1],
            "config": self.plan_config.to_state(),
            "stream": spans_to_state(self._current_stream),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken, on the same topology.

        To resume on another world size or number of workers, use :meth:`resume` (the
        :class:`~lightning_patterns.data.streaming.loader.StreamingDataLoader` does it for you).
        """
        num_workers, _ = current_worker()
        if PlanConfig.from_state(state["config"]) != self.plan_config:
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
        self.epoch = int(state["epoch"])
        self._resume_units = int(state["units_yielded"])
        self._resume_stream = spans_from_state(state.get("stream"))
        self._resume_pending = True
        self._iterated = False

    def resume(self, point: ResumePoint, stream: Sequence[Span] | None = None) -> None:
        """Continue the epoch of ``point``, yielding each of its remaining samples once on this topology.

        Args:
            point: where every rank stood.
            stream: ``remaining_stream(point)`` if the caller has computed it already.
        """
        if point.config != self.plan_config:
            raise ValueError(
                "The resume point was saved with other dataset settings (batch size, seed, shuffle, drop_last, window "
                "or shards differ): construct the dataset with the settings of the saved run."
            )
        if self._balancer is not None:
            self._resume_balanced(point)
            return
        self.epoch = point.epoch
        self._resume_stream = tuple(remaining_stream(point) if stream is None else stream)
        self._resume_units = 0
        self._resume_pending = True
        self._iterated = False

    def _resume_balanced(self, point: ResumePoint) -> None:
        # Balanced batches regroup samples across a look-ahead, so what was consumed is known only by replaying
        # the same plan: possible on the same topology, where each worker skips the batches it delivered.
        world_size = self.rank_and_world_size[1]
        if point.world_size != world_size or point.num_workers != self._num_workers_hint or point.stream is not None:
            raise ValueError(
                f"Resuming class-balanced batches (min_per_class={self.min_per_class}) needs the topology that saved "
                f"the state: world_size={point.world_size}, num_workers={point.num_workers} (this run has "
                f"world_size={world_size}, num_workers={self._num_workers_hint}). Resume on that topology, or start "
                "the epoch afresh."
            )
        self.epoch = point.epoch
        self._resume_skip = point
        self._resume_stream = None
        self._resume_units = 0
        self._resume_pending = True
        self._iterated = False

    def batches_in(self, stream: Sequence[Span] | None) -> int:
        """Batches (units) each rank yields over ``stream`` (``None``: a whole epoch)."""
        total = self.manifest.num_samples if stream is None else sum(stop - start for _, start, stop in stream)
        per_rank = samples_per_rank(total, self.rank_and_world_size[1], self.drop_last)
        return -(-per_rank // self.batch_size) if self.batch_size else per_rank

    # ------------------------------------------------------------------ reading

    def _describe(self, shard: int) -> str:
        return shard_url(self.url, self.manifest.shards[shard].path)

    def _fetch(self, shard: int, deadline: Deadline | None) -> memoryview:
        info = self.manifest.shards[shard]
        return fetch_shard(self._reader, info, verify=self.verify_checksums, deadline=deadline)

    def _load(self, shard: int, deadline: Deadline | None = None) -> ShardReader:
        if self.cache is None:
            data: Any = self._fetch(shard, deadline)
        else:
            data = self.cache.get_or_fetch(shard, lambda: self._fetch(shard, deadline))
        # The header is checked against the manifest entry before any sample of the shard is decoded.
        return open_shard(data, self.manifest.shards[shard], self.manifest.schema, self._describe(shard))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._resume_pending:
            skip, stream = self._resume_units, self._resume_stream
            self._resume_pending = False
        else:
            if self._iterated:
                self.epoch += 1
            skip, stream = 0, None
        self._iterated = True
        topology = self.topology()
        plan = plan_for(self.plan_config, topology, self.epoch, stream)
        if self._resume_skip is not None:
            point, self._resume_skip = self._resume_skip, None
            # The point was taken on this topology (resume() checked it): skip what this worker had delivered.
            skip = delivered(point, topology.rank)[topology.worker_id][1]
        self._current_stream = stream
        self._units_yielded = skip
        return self._generate(plan, skip, topology.worker_id + 1 if topology.num_workers else 0)

    def _generate(self, plan: WorkerPlan, skip_units: int, slot: int) -> Iterator[dict[str, Any]]:
        if plan.num_samples == 0:
            return
        indices = PlanIndices(plan)
        unit = self.batch_size or 1
        positions = BatchPositions(
            plan.num_samples,
            self.batch_size or _SAMPLE_CHUNK,
            first_position=skip_units * unit,
            skip_batches=skip_units,
            balancer=self._balancer,
            read_labels=lambda begin, end: self._read_labels(pipeline, *self._locate(indices.between(begin, end))),
        )
        balanced = self._balancer is not None
        pending, last_position, schedule = shard_use_of(
            plan, len(self.manifest.shards), self._offsets, positions.first_needed
        )
        # Snapshot the counters before the read-ahead threads start, so their first fetches are counted.
        fetched = self._reader.stats.snapshot()
        cache_seen = self.cache.stats() if self.cache is not None else (0, 0)
        pipeline = ReadAhead(
            schedule,
            [shard.num_bytes for shard in self.manifest.shards],
            self._load,
            read_ahead=self.read_ahead,
            read_ahead_bytes=self.read_ahead_bytes,
            threads=self.read_threads,
            timeout=self.fetch_timeout,
            describe=self._describe,
        )
        use = ShardUse(pending, last_position, balanced, pipeline.release)
        positions.on_labels = use.labels_read
        waited = 0.0
        try:
            for batch_positions, skipped in positions:
                shards, local = self._locate(indices.at(batch_positions))
                if skipped:
                    use.gathered(shards)
                    continue
                batch = self._gather(pipeline, shards, local)
                use.gathered(shards)
                fetched, waited = self._record(slot, fetched, waited, pipeline.wait_seconds, batch_positions.size)
                cache_seen = self._record_cache(slot, cache_seen)
                if self.batch_size:
                    self._units_yielded += 1
                    yield batch
                else:
                    for row in range(batch_positions.size):
                        self._units_yielded += 1
                        yield {name: value[row] for name, value in batch.items()}
        finally:
            pipeline.close()

    def _locate(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, index within the shard)`` of global sample indices."""
        shards = np.searchsorted(self._offsets, global_indices, side="right") - 1
        return shards, global_indices - self._offsets[shards]

    def _read_labels(self, pipeline: ReadAhead, shards: np.ndarray, local: np.ndarray) -> np.ndarray:
        labels = np.empty(shards.size, dtype=np.int64)
        for shard in np.unique(shards).tolist():
            mask = shards == shard
            labels[mask] = pipeline.get(shard).read_field(self.label_field, local[mask]).reshape(-1)
        return labels

    def _record(
        self, slot: int, fetched: FetchStatsSnapshot, waited: float, wait_total: float, samples: int
    ) -> tuple[FetchStatsSnapshot, float]:
        now = self._reader.stats.snapshot()
        delta = now - fetched
        self.counters.add(
            slot,
            samples=samples,
            remote_bytes=delta.bytes_read,
            remote_requests=delta.requests,
            retries=delta.retries,
            fetch_seconds=delta.seconds,
            read_wait_seconds=wait_total - waited,
        )
        return now, wait_total

    def _record_cache(self, slot: int, seen: tuple[int, int]) -> tuple[int, int]:
        if self.cache is None:
            return seen
        hits, misses = self.cache.stats()
        self.counters.add(slot, cache_hits=hits - seen[0], cache_misses=misses - seen[1])
        return hits, misses

    def _gather(self, pipeline: ReadAhead, shards: np.ndarray, local: np.ndarray) -> dict[str, Any]:
        first = only_shard(shards)
        if first is not None:
            reader = pipeline.get(first)
            start = int(local[0])
            if int(local[-1]) - start == local.size - 1 and bool(np.all(np.diff(local) == 1)):
                return reader.read_range(start, start + local.size)
            return reader.read_batch(local)
        # The batch spans several shards: gather each shard's part, then restore the batch order.
        by_shard = np.argsort(shards, kind="stable")
        parts = []
        sorted_shards = shards[by_shard]
        bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
        for group in np.split(by_shard, bounds):
            parts.append(pipeline.get(int(shards[group[0]])).read_batch(local[group]))
        inverse = torch.from_numpy(np.argsort(by_shard, kind="stable"))
        out: dict[str, Any] = {}
        for name in parts[0]:
            values = [part[name] for part in parts]
            if isinstance(values[0], torch.Tensor):
                out[name] = torch.cat(values)[inverse]
            else:
                flat = [item for value in values for item in value]
                out[name] = [flat[i] for i in inverse.tolist()]
        return out

    def metrics(self) -> dict[str, float]:
        """Counters summed over this rank's workers: samples, remote bytes and requests, retries, waits."""
        return self.counters.totals()

    def __repr__(self) -> str:
        return (
            f"StreamingDataset(url={self.url!r}, samples={self.manifest.num_samples}, "
            f"shards={len(self.manifest.shards)}, batch_size={self.batch_size}, shuffle={self.shuffle})"
        )


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be at least 1 (or None), got {name}={value!r}.")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {name}={value!r}.")
