"""``StreamingDataLoader``: advances the epoch and resumes mid-epoch on any topology.

A ``StatefulDataLoader`` for :class:`StreamingDataset`.
It saves one small :class:`~lightning_patterns.data.streaming.resume.ResumePoint` instead of per-worker states:
the epoch and the number of batches this rank delivered. Since every rank delivers the same number of
batches, that is enough to rebuild what every rank still has to yield, and a job restarted with another
world size or number of workers yields each remaining sample of the epoch once.

The batch size can change in the middle of an epoch (:meth:`StreamingDataLoader.set_batch_size` with
``at_batch``): at that batch the loader takes the resume point of what it delivered, re-plans the remaining
spans at the new batch size (the elastic-resume path, on the same topology) and goes on reading, so no sample
is lost or repeated. Every rank given the same ``at_batch`` still yields the same number of batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_patterns._warnings import silence_known_noise
from lightning_patterns.data.sharding.assignment import Span
from lightning_patterns.data.streaming.cursor import StreamCursor
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.metrics import timed
from lightning_patterns.data.streaming.resume import ResumePoint, remaining_stream

__all__ = ["StreamingDataLoader"]

_STATE_KEY = "lightning_patterns"

silence_known_noise()


class StreamingDataLoader(StatefulDataLoader):  # type: ignore[misc]
    """Iterates a :class:`StreamingDataset` that yields whole batches; one epoch per ``iter()``.

    Args:
        dataset: the dataset; its ``batch_size`` must be set (batches are decoded whole, not collated).
        num_workers: DataLoader worker processes (``0``: read in the main process with background threads).
        **kwargs: further ``DataLoader`` arguments (``pin_memory``, ``timeout``, ``multiprocessing_context``,
            ``prefetch_factor``...). ``batch_size``, ``shuffle``, ``sampler`` and ``persistent_workers`` are
            decided by the dataset and may not be given.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, StreamingDataset):
            raise TypeError(f"StreamingDataLoader needs a StreamingDataset, got {type(dataset).__name__}.")
        if dataset.batch_size is None:
            raise ValueError(
                "StreamingDataLoader needs the dataset to yield whole batches: construct it with "
                "`StreamingDataset(url, batch_size=N)`, or use a plain StatefulDataLoader with `batch_size=N`."
            )
        taken = sorted({"batch_size", "shuffle", "sampler", "batch_sampler", "persistent_workers"} & set(kwargs))
        if taken:
            raise ValueError(
                f"StreamingDataLoader decides {', '.join(taken)} itself: set batching and shuffling on the "
                "StreamingDataset instead."
            )
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got num_workers={num_workers!r}.")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs)
        dataset.set_num_workers(num_workers)
        self._epoch = dataset.epoch
        self._started = False
        self._batches_yielded = 0
        self._stream: tuple[Span, ...] | None = None
        self._batches_before = 0
        self._pending: ResumePoint | None = None
        self._pending_stream: list[Span] = []
        # When a trainer reports the batches it consumed, the state counts those, not the ones prefetched: the
        # epoch's batch index (counted from its start) of the first batch not consumed yet.
        self._consumed_position: int | None = None
        # A batch-size change due in this epoch: (epoch, batch_size, at_batch); and the point where the latest one
        # happened, so a checkpoint of a batch consumed before it (Lightning prefetches) still resumes exactly.
        self._switch: tuple[int, int, int] | None = None
        self._previous_segment: ResumePoint | None = None
        # The batch size of the next epoch, when changed while an epoch is being read.
        self._next_batch_size: int | None = None
        self.wait_seconds = 0.0
        # Seconds from the start of the latest iteration (workers starting included) to its first batch.
        self.first_batch_seconds = 0.0
        self._iter_started = 0.0

    @property
    def epoch(self) -> int:
        """The epoch being read (or to be read next, before the first ``iter()``)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read ``epoch`` from its start."""
        self._epoch = epoch
        self._started = False
        self._pending = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iter_started = time.perf_counter()
        dataset: StreamingDataset = self.dataset
        self._batches_yielded = 0
        self._previous_segment = None
        if self._next_batch_size is not None and self._pending is None:
            dataset.set_batch_size(self._next_batch_size)
            self._next_batch_size = None
        if self._pending is not None:
            point, self._pending = self._pending, None
            dataset.reset(dataset.cursor_at(point, self._pending_stream))
            self._epoch = point.epoch
            if dataset.min_per_class is None:
                self._stream = tuple(self._pending_stream)
                self._batches_before = point.batches_done
            else:
                # Replayed, not re-planned: the epoch keeps its plan, and this loader counts from its start.
                self._stream = None
                self._batches_before = 0
                self._batches_yielded = point.batches_yielded
        else:
            if self._started:
                self._epoch += 1
            dataset.reset(StreamCursor(self._epoch))
            self._stream = None
            self._batches_before = 0
        self._started = True
        if self._switch is not None and self._switch[0] != self._epoch:
            self._switch = None  # asked for during an epoch that ended before its batch
        if self._consumed_position is not None:
            self._consumed_position = self._position
        return self._counted(super().__iter__())

    @property
    def _position(self) -> int:
        """The epoch's batch index of the next batch this loader delivers."""
        return self._batches_before + self._batches_yielded

    def set_batch_size(self, batch_size: int, at_batch: int | None = None) -> None:
        """Change the batch size of the stream.

        Args:
            batch_size: samples per batch from the change on, at least 1.
            at_batch: ``None``: from the next epoch (at once when no epoch is being read). An integer: from batch
                ``at_batch`` (0-based, counted from the epoch's start) of the epoch being read, or of the epoch
                the next ``iter()`` reads when none is; the remaining samples are re-planned at the new size, so
                none is lost or repeated. Give every rank the same ``at_batch``.

        Raises:
            ValueError: ``batch_size < 1``; a class-balanced or single-sample dataset; ``at_batch`` already
                delivered, or not before the end of the epoch (use ``at_batch=None`` then).
        """
        dataset: StreamingDataset = self.dataset
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if dataset.batch_size is None or dataset.min_per_class is not None:
            dataset.set_batch_size(batch_size)  # raises the dataset's own explanation, unless the size is the same
            return
        reading = self._started and self._position < len(self)
        if at_batch is None:
            self._switch = None
            if reading or self._pending is not None:
                self._next_batch_size = batch_size
            else:
                dataset.set_batch_size(batch_size)
            return
        position = self._pending.batches_done if self._pending is not None else self._position if reading else 0
        length = len(self)
        if not position <= at_batch < length:
            raise ValueError(
                f"Cannot change the batch size at batch at_batch={at_batch!r} of epoch {self._epoch}: this loader "
                f"has delivered {position} of its {length} batches, so at_batch must lie in [{position}, {length}). "
                "Pass a later batch, or at_batch=None to change it from the next epoch."
            )
        if not reading and self._pending is None and self._started:
            # The epoch was read to its end: `at_batch` counts in the next one.
            self._epoch += 1
            self._started = False
        self._next_batch_size = None
        self._switch = (self._epoch, batch_size, at_batch)

    def _switched(self, old: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Stop reading ``old`` and go on with what remains of the epoch at the new batch size."""
        assert self._switch is not None
        _, batch_size, _ = self._switch
        self._switch = None
        dataset: StreamingDataset = self.dataset
        point = self.resume_point(self._batches_yielded)
        stream = remaining_stream(point)
        _close(old)
        dataset.set_batch_size(batch_size)
        dataset.reset(StreamCursor(point.epoch, tuple(stream)))
        self._previous_segment = point
        self._stream = tuple(stream)
        self._batches_before = point.batches_done
        self._batches_yielded = 0
        return iter(super().__iter__())

    def track_consumption(self) -> None:
        """Save the batches reported through :meth:`mark_consumed` instead of the batches delivered.

        Lightning fetches one batch ahead of the one it trains on; a checkpoint taken mid-epoch must
        resume at the first batch not trained on, not after the prefetched one.
        """
        self._consumed_position = self._position

    def mark_consumed(self) -> None:
        """One more delivered batch went into training (see :meth:`track_consumption`)."""
        if self._consumed_position is not None:
            self._consumed_position = min(self._consumed_position + 1, self._position)

    def _counted(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        first = True
        source = timed(batches, self._waited)
        while True:
            switch = self._switch
            if switch is not None and switch[0] == self._epoch and switch[2] == self._position:
                batches = self._switched(batches)
                source = timed(batches, self._waited)
            try:
                batch = next(source)
            except StopIteration:
                return
            if first:
                first = False
                self.first_batch_seconds = time.perf_counter() - self._iter_started
            self._batches_yielded += 1
            yield batch

    def _waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def resume_point(self, batches_consumed: int | None = None) -> ResumePoint:
        """Where this rank stands: ``batches_consumed`` (default: all delivered) batches into the epoch.

        ``batches_consumed`` counts from where the current plan began (the start of the epoch, of a resumed part
        of it, or of the latest batch-size change). By default the point is the consumed position of
        :meth:`track_consumption`, which may lie just before the latest batch-size change.
        """
        dataset: StreamingDataset = self.dataset
        if batches_consumed is None:
            position = self._position if self._consumed_position is None else self._consumed_position
            previous = self._previous_segment
            if position < self._batches_before and previous is not None and position >= previous.batches_before:
                return replace(previous, batches_yielded=position - previous.batches_before)
            batches_consumed = position - self._batches_before
        consumed = batches_consumed
        if not 0 <= consumed <= self._batches_yielded:
            raise ValueError(
                f"batches_consumed={consumed} must lie between 0 and the {self._batches_yielded} batches delivered."
            )
        return ResumePoint(
            epoch=self._epoch,
            batches_yielded=consumed,
            world_size=dataset.rank_and_world_size[1],
            num_workers=self.num_workers,
            config=dataset.plan_config,
            stream=self._stream,
            batches_before=self._batches_before,
        )

    def __len__(self) -> int:
        """Batches of the epoch being read, those delivered before an interruption included.

        A Trainer resuming mid-epoch counts the batches it trained before the checkpoint; with the batches
        that remain (re-planned for this topology) the count is the epoch's length as this rank sees it.
        """
        dataset: StreamingDataset = self.dataset
        if self._pending is not None:
            if dataset.min_per_class is not None:
                return len(dataset)
            return self._pending.batches_done + dataset.batches_in(self._pending_stream)
        if self._stream is not None:
            return self._batches_before + dataset.batches_in(self._stream)
        return len(dataset)

    def state_dict(self) -> dict[str, Any]:
        """The resume point, as builtins: safe to put in a Lightning checkpoint."""
        if self._pending is not None:
            return {_STATE_KEY: self._pending.to_state()}
        return {_STATE_KEY: self.resume_point().to_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`, on this loader's world size and number of workers."""
        if _STATE_KEY not in state_dict:
            raise ValueError(
                "This state was not saved by a StreamingDataLoader (no 'lightning_patterns' key): it cannot resume "
                "a stream. Load it into the loader type that saved it, or start the epoch afresh."
            )
        point = ResumePoint.from_state(state_dict[_STATE_KEY])
        dataset: StreamingDataset = self.dataset
        if point.config.batch_size != dataset.plan_config.batch_size and dataset.batch_size is not None:
            # Saved after a batch-size change: the epoch goes on at the batch size it had then.
            dataset.set_batch_size(point.config.batch_size)
        self._previous_segment = None  # a change asked for stays: Lightning loads the state again after the DataModule
        if dataset.min_per_class is not None:
            # Balanced batches resume by replaying the plan on the same topology (see StreamingDataset.cursor_at).
            self._pending, self._pending_stream, self._epoch = point, [], point.epoch
            return
        stream = remaining_stream(point)
        if not stream:
            # The saved epoch was complete: carry on with the next one.
            self.set_epoch(point.epoch)
            self._started = True
            return
        self._pending, self._pending_stream = point, stream
        self._epoch = point.epoch

    def metrics(self) -> dict[str, float]:
        """Counters of this rank: samples, remote bytes and requests, retries, and seconds waited for data.

        ``first_batch_seconds`` is the time from the start of the latest iteration (worker processes starting
        included) to its first batch, as this loader saw it.
        """
        dataset: StreamingDataset = self.dataset
        return {
            **dataset.metrics(),
            "loader_wait_seconds": self.wait_seconds,
            "first_batch_seconds": self.first_batch_seconds,
        }


def _close(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator now: its worker processes, or its generator's read-ahead threads."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    fetcher = getattr(batches, "_dataset_fetcher", None)
    generator = getattr(fetcher, "dataset_iter", None)
    close = getattr(generator, "close", None)
    if callable(close):
        close()
