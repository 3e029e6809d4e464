"""``StreamingDataLoader``: advances the epoch and resumes mid-epoch on any topology.

A ``StatefulDataLoader`` for :class:`StreamingDataset`.
It saves one small :class:`~lightning_patterns.data.streaming.resume.ResumePoint` instead of per-worker states:
the epoch and the number of batches this rank delivered. Since every rank delivers the same number of
batches, that is enough to rebuild what every rank still has to yield, and a job restarted with another
world size or number of workers yields each remaining sample of the epoch once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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
        # When a trainer reports the batches it consumed, the state counts those, not the ones prefetched.
        self._batches_consumed: int | None = None
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
        if self._batches_consumed is not None:
            self._batches_consumed = self._batches_yielded
        return self._counted(super().__iter__())

    def track_consumption(self) -> None:
        """Save the batches reported through :meth:`mark_consumed` instead of the batches delivered.

        Lightning fetches one batch ahead of the one it trains on; a checkpoint taken mid-epoch must
        resume at the first batch not trained on, not after the prefetched one.
        """
        self._batches_consumed = 0

    def mark_consumed(self) -> None:
        """One more delivered batch went into training (see :meth:`track_consumption`)."""
        if self._batches_consumed is not None:
            self._batches_consumed = min(self._batches_consumed + 1, self._batches_yielded)

    def _counted(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        first = True
        for batch in timed(batches, self._waited):
            if first:
                first = False
                self.first_batch_seconds = time.perf_counter() - self._iter_started
            self._batches_yielded += 1
            yield batch

    def _waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def resume_point(self, batches_consumed: int | None = None) -> ResumePoint:
        """Where this rank stands: ``batches_consumed`` (default: all delivered) batches into the epoch."""
        dataset: StreamingDataset = self.dataset
        if batches_consumed is None:
            batches_consumed = self._batches_yielded if self._batches_consumed is None else self._batches_consumed
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
