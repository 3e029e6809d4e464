"""The shape of a training job as the read plan sees it, and a point at which an epoch stops and resumes.

:class:`JobTopology` is what :func:`~lightning_patterns.testing.balance.check_balance` checks a dataset
against (and what :func:`~lightning_patterns.testing.strategies.topologies` draws): how many ranks on how many
nodes, how many DataLoader workers per rank, and the loader settings that decide which samples each of them
reads. :class:`ResumePoint` stops an epoch part-way and finishes it on another topology.

Example:
    >>> JobTopology(world_size=8, num_nodes=2, num_workers=4, batch_size=32)
    JobTopology(world_size=8, num_nodes=2, num_workers=4, batch_size=32, drop_last=False, min_per_class=None, \
shuffle=False, seed=0, span_samples=None)
    >>> JobTopology(world_size=6, num_nodes=4)
    Traceback (most recent call last):
    ...
    ValueError: JobTopology(world_size=6, num_nodes=4): world_size must be a multiple of num_nodes (every node \
runs the same number of ranks); pass world_size=num_nodes * devices, e.g. world_size=8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from lightning_patterns.data.sharding.assignment import PlanConfig

__all__ = ["JobTopology", "ResumePoint"]

# Whether the read plan itself assigns spans by class (it then takes the shards' label histograms).
_PLAN_TAKES_CLASSES = {"class_counts", "min_per_class"} <= {field.name for field in fields(PlanConfig)}


def _check_int(name: str, value: object, least: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"JobTopology({name}={value!r}) must be an integer >= {least}; {hint}.")


@dataclass(frozen=True)
class JobTopology:
    """A training job's ranks, nodes and DataLoader workers, and the loader settings that shape its read plan.

    Args:
        world_size: Number of ranks (processes), ``>= 1``; a multiple of ``num_nodes``.
        num_nodes: Number of machines, ``>= 1``; each runs ``world_size // num_nodes`` ranks.
        num_workers: The DataLoader's ``num_workers`` per rank, ``>= 0`` (``0``: the main process reads).
        batch_size: Samples per batch, ``>= 1``; each DataLoader worker batches its own samples.
        drop_last: Drop up to ``world_size - 1`` samples per epoch instead of repeating as many.
        min_per_class: When set, class-balanced batches: every DataLoader worker must hold this many samples of
            every class for each of its batches (checked from the manifest's per-shard label histograms, see
            :func:`~lightning_patterns.testing.balance.check_balance`); ``None`` checks no classes.
        shuffle: Shuffle the span order per epoch, as ``StreamingDataset(shuffle=True)``.
        seed: The shuffle seed, ``>= 0``.
        span_samples: Split shards into spans of at most this many samples before shuffling (``None``: whole
            shards), as ``StreamingDataset(span_samples=...)``.

    Raises:
        ValueError: A value is out of range; the message names it and says what is expected.
    """

    world_size: int = 1
    num_nodes: int = 1
    num_workers: int = 0
    batch_size: int = 1
    drop_last: bool = False
    min_per_class: int | None = None
    shuffle: bool = False
    seed: int = 0
    span_samples: int | None = None

    def __post_init__(self) -> None:
        _check_int("world_size", self.world_size, 1, "pass the number of processes, e.g. world_size=8")
        _check_int("num_nodes", self.num_nodes, 1, "pass the number of machines, e.g. num_nodes=1")
        _check_int("num_workers", self.num_workers, 0, "use 0 for the main process alone")
        _check_int("batch_size", self.batch_size, 1, "e.g. batch_size=32")
        _check_int("seed", self.seed, 0, "numpy's SeedSequence takes non-negative seeds")
        if self.min_per_class is not None:
            _check_int("min_per_class", self.min_per_class, 1, "use None to check no classes")
        if self.span_samples is not None:
            _check_int("span_samples", self.span_samples, 1, "use None for whole shards")
        if self.world_size % self.num_nodes:
            raise ValueError(
                f"JobTopology(world_size={self.world_size}, num_nodes={self.num_nodes}): world_size must be a "
                "multiple of num_nodes (every node runs the same number of ranks); pass world_size=num_nodes * "
                f"devices, e.g. world_size={self.num_nodes * max(1, -(-self.world_size // self.num_nodes))}."
            )

    @property
    def devices_per_node(self) -> int:
        """Ranks per node."""
        return self.world_size // self.num_nodes

    @property
    def workers_per_rank(self) -> int:
        """Worker plans per rank: ``num_workers``, or 1 (the main process) when it is 0."""
        return max(self.num_workers, 1)

    def node_of(self, rank: int) -> int:
        """The node that runs ``rank`` (ranks are numbered node by node, as Lightning does)."""
        return rank // self.devices_per_node

    def plan_config(
        self, shard_sizes: Sequence[int], class_counts: Sequence[Sequence[int]] | None = None
    ) -> PlanConfig:
        """The :class:`~lightning_patterns.data.sharding.assignment.PlanConfig` of this job, as a dataset builds it.

        Args:
            shard_sizes: Samples per shard.
            class_counts: Each shard's label histogram. With ``min_per_class`` set, a planner that plans classes
                (a ``PlanConfig`` with ``class_counts`` and ``min_per_class`` fields) gets both, as
                ``StreamingDataset(min_per_class=...)`` passes them; other planners plan without them.
        """
        classes: dict[str, Any] = {}
        if self.min_per_class is not None and class_counts is not None and _PLAN_TAKES_CLASSES:
            classes = {"class_counts": class_counts, "min_per_class": self.min_per_class}
        return PlanConfig(
            shard_sizes,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            span_samples=self.span_samples,
            **classes,
        )

    def describe(self) -> str:
        """One line for messages: ``world_size=8 (2 nodes × 4), num_workers=2, batch_size=32, drop_last=False``."""
        nodes = f" ({self.num_nodes} nodes × {self.devices_per_node})" if self.num_nodes > 1 else ""
        parts = [
            f"world_size={self.world_size}{nodes}",
            f"num_workers={self.num_workers}",
            f"batch_size={self.batch_size}",
            f"drop_last={self.drop_last}",
        ]
        if self.min_per_class is not None:
            parts.append(f"min_per_class={self.min_per_class}")
        if self.shuffle:
            parts.append(f"shuffle=True, seed={self.seed}")
        if self.span_samples is not None:
            parts.append(f"span_samples={self.span_samples}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ResumePoint:
    """Where an epoch stops, and the job that finishes it (another world size, node or worker count).

    The stopping job is the topology :func:`~lightning_patterns.testing.balance.check_balance` is given. Each
    of its workers has yielded the first ``floor(progress[i] * n_i)`` of its ``n_i`` samples; the rest of the
    epoch, gathered from every worker, is re-planned for ``topology`` (as a checkpoint restored on another
    cluster does, see ``WorkerPlan.remaining_spans``).

    Args:
        progress: For every worker of the stopping job, rank-major (rank 0's workers first), the fraction in
            ``[0, 1]`` of its samples it had yielded.
        topology: The job that finishes the epoch.

    Raises:
        ValueError: A fraction is outside ``[0, 1]``.
    """

    progress: tuple[float, ...]
    topology: JobTopology

    def __post_init__(self) -> None:
        object.__setattr__(self, "progress", tuple(float(f) for f in self.progress))
        bad = [i for i, f in enumerate(self.progress) if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(
                f"ResumePoint(progress=...) holds fractions of each worker's samples, in [0, 1]; got "
                f"progress[{bad[0]}]={self.progress[bad[0]]!r}."
            )

    def consumed(self, stopping: JobTopology, samples: Sequence[int]) -> list[int]:
        """How many samples each worker of ``stopping`` had yielded, given how many each plans (rank-major).

        Raises:
            ValueError: ``progress`` does not have one fraction per worker of ``stopping``.
        """
        expected = stopping.world_size * stopping.workers_per_rank
        if len(self.progress) != expected:
            raise ValueError(
                f"ResumePoint has {len(self.progress)} progress fractions, but the stopping job "
                f"({stopping.describe()}) has {expected} workers (world_size × max(num_workers, 1)): give one "
                "fraction per worker, rank-major (e.g. drawn by "
                "lightning_patterns.testing.strategies.resume_points(topology))."
            )
        return [int(fraction * n) for fraction, n in zip(self.progress, samples, strict=True)]
