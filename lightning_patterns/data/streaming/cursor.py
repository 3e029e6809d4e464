"""``StreamCursor``: where an iteration of a :class:`~lightning_patterns.data.streaming.StreamingDataset` begins.

The dataset keeps one cursor, a frozen value, as torchdata's ``BaseNode`` keeps its state: ``reset(state)`` is
the one way in (it replaces the cursor) and ``state_dict()`` the one way out. An iteration plans its worker's
samples from the cursor (:func:`~lightning_patterns.data.sharding.plan` with the cursor's epoch and stream)
and skips what the cursor says this worker had already delivered.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_patterns.data.sharding.assignment import Span

__all__ = ["StreamCursor"]


@dataclass(frozen=True)
class StreamCursor:
    """A position in the stream of one rank: an epoch, what it is planned over, and what was delivered of it.

    Args:
        epoch: the epoch, ``>= 0`` (it seeds the shuffle).
        stream: the spans the epoch is planned over when it finishes an interrupted one (the remaining spans
            of every rank and worker, see :func:`~lightning_patterns.data.streaming.resume.remaining_stream`);
            ``None`` for the whole epoch.
        delivered: units (batches, or samples when the dataset yields single samples) each DataLoader worker of
            this rank had already yielded of that plan, by worker id; workers past the end delivered none.

    Raises:
        ValueError: a negative ``epoch`` or count.

    Example:
        >>> StreamCursor(epoch=2, delivered=(3, 2)).delivered_by(1)
        2
        >>> StreamCursor(epoch=2).next_epoch()
        StreamCursor(epoch=3, stream=None, delivered=())
    """

    epoch: int = 0
    stream: tuple[Span, ...] | None = None
    delivered: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"`epoch` must be >= 0, got epoch={self.epoch!r}.")
        if any(count < 0 for count in self.delivered):
            raise ValueError(f"Units delivered must be >= 0 per worker, got delivered={self.delivered!r}.")

    def delivered_by(self, worker_id: int) -> int:
        """Units worker ``worker_id`` had already yielded of this cursor's plan."""
        return self.delivered[worker_id] if worker_id < len(self.delivered) else 0

    def next_epoch(self) -> StreamCursor:
        """The start of the following epoch."""
        return StreamCursor(self.epoch + 1)
