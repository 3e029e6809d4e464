"""Exact and elastic mid-epoch resumption for streamed data.

A :class:`ResumePoint` says how far one rank got in an epoch: ``batches_yielded`` batches under the plan
of the topology that saved it. Every rank yields the same number of batches (the assignment guarantees
it and DDP keeps ranks in step), so one rank's count tells what every rank consumed. From it,
:func:`remaining_stream` rebuilds the spans not yet yielded by any rank or worker, and the new topology
(another world size or number of workers) splits exactly those. Resuming on the same topology is the
special case where the split gives every worker the rest of its own plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_patterns.data.sharding.assignment import PlanConfig, Span, WorkerPlan, plan, plan_epoch
from lightning_patterns.data.sharding.topology import Topology

__all__ = [
    "ResumePoint",
    "batches_per_worker",
    "delivered",
    "remaining_stream",
    "spans_from_state",
    "spans_to_state",
]

RESUME_FORMAT = 1


def batches_per_worker(batch_counts: Sequence[int], batches_yielded: int) -> list[int]:
    """How many batches each worker had delivered after the DataLoader yielded ``batches_yielded``.

    A DataLoader over an IterableDataset asks its workers in turn, in order, and skips a worker once it
    is exhausted; so delivery is round-robin over the workers that still have batches.

    >>> batches_per_worker([3, 2], 4)
    [2, 2]
    >>> batches_per_worker([3, 1], 4)
    [3, 1]
    """
    total = sum(batch_counts)
    if not 0 <= batches_yielded <= total:
        raise ValueError(
            f"batches_yielded={batches_yielded} is out of range: the workers hold {total} batches in all. "
            "The state does not belong to this dataset; start the epoch afresh instead of loading it."
        )
    delivered = [0] * len(batch_counts)
    left = batches_yielded
    while left:
        active = [w for w, count in enumerate(batch_counts) if delivered[w] < count]
        rounds = min(left // len(active), min(batch_counts[w] - delivered[w] for w in active))
        if rounds == 0:
            for w in active[:left]:
                delivered[w] += 1
            break
        for w in active:
            delivered[w] += rounds
        left -= rounds * len(active)
    return delivered


@dataclass(frozen=True)
class ResumePoint:
    """How far one rank got through an epoch, enough to rebuild what every rank still has to yield.

    Args:
        epoch: the interrupted epoch.
        batches_yielded: batches this rank's loader delivered in it.
        world_size: ranks of the job that saved the point.
        num_workers: DataLoader workers per rank of that job.
        config: the plan settings of that job.
        stream: the stream the epoch was planned over, when it was itself a resumed epoch.
        batches_before: batches of the epoch each rank delivered before ``stream`` began (when resumed), so
            that the epoch's batch count stays what a Trainer counted before the interruption.
    """

    epoch: int
    batches_yielded: int
    world_size: int
    num_workers: int
    config: PlanConfig
    stream: tuple[Span, ...] | None = field(default=None)
    batches_before: int = 0

    @property
    def batches_done(self) -> int:
        """Batches of the epoch each rank delivered, counting from the epoch's start."""
        return self.batches_before + self.batches_yielded

    def to_state(self) -> dict[str, Any]:
        """A plain dict of builtins, safe for ``torch.save`` and checkpoints."""
        return {
            "format": RESUME_FORMAT,
            "epoch": self.epoch,
            "batches_yielded": self.batches_yielded,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "config": self.config.to_state(),
            "stream": spans_to_state(self.stream),
            "batches_before": self.batches_before,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ResumePoint:
        """Rebuild from :meth:`to_state`'s dict."""
        if state.get("format") != RESUME_FORMAT:
            raise ValueError(
                f"Unknown streaming state format {state.get('format')!r}; this version reads format {RESUME_FORMAT}. "
                "The state was saved by another version of lightning_patterns: start the epoch afresh."
            )
        return cls(
            epoch=int(state["epoch"]),
            batches_yielded=int(state["batches_yielded"]),
            world_size=int(state["world_size"]),
            num_workers=int(state["num_workers"]),
            config=PlanConfig.from_state(state["config"]),
            stream=spans_from_state(state["stream"]),
            batches_before=int(state.get("batches_before", 0)),
        )


def spans_to_state(spans: Sequence[Span] | None) -> list[list[int]] | None:
    """Spans as lists of ints (``None`` stays ``None``), for state dicts."""
    return None if spans is None else [list(span) for span in spans]


def spans_from_state(spans: Sequence[Sequence[int]] | None) -> tuple[Span, ...] | None:
    """Inverse of :func:`spans_to_state`."""
    return None if spans is None else tuple((int(a), int(b), int(c)) for a, b, c in spans)


def delivered(point: ResumePoint, rank: int) -> list[tuple[WorkerPlan, int]]:
    """Each worker of ``rank`` at ``point``: its plan and the batches (units) it had delivered."""
    workers = range(max(point.num_workers, 1))
    topologies = [Topology(point.world_size, rank, point.num_workers, worker) for worker in workers]
    return _with_delivered(point, [plan(point.config, topology, point.epoch, point.stream) for topology in topologies])


def remaining_stream(point: ResumePoint) -> list[Span]:
    """The spans no rank or worker had yielded at ``point``, rank-major, in each worker's read order."""
    unit = point.config.batch_size
    every_rank = plan_epoch(
        point.config, point.epoch, world_size=point.world_size, num_workers=point.num_workers, resume=point.stream
    )
    remaining: list[Span] = []
    for rank_plans in every_rank:
        for worker_plan, batches in _with_delivered(point, rank_plans):
            remaining.extend(worker_plan.remaining_spans(min(batches * unit, worker_plan.num_samples)))
    return remaining


def _with_delivered(point: ResumePoint, plans: list[WorkerPlan]) -> list[tuple[WorkerPlan, int]]:
    """The plans of one rank's workers, each with the batches it had delivered at ``point``."""
    counts = [-(-worker_plan.num_samples // point.config.batch_size) for worker_plan in plans]
    return list(zip(plans, batches_per_worker(counts, point.batches_yielded), strict=True))
