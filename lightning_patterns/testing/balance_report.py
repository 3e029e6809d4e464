"""What :func:`~lightning_patterns.testing.balance.check_balance` found: rows per rank and worker, and the verdict.

A :class:`BalanceReport` holds one :class:`RankBalance` per rank (each with one :class:`WorkerBalance` per
DataLoader worker) of every run of the epoch (one, or two across a resume), the epoch-wide counts of
duplicated and lost samples with the padding and dropping the plan documents, and the violated invariants.
:meth:`BalanceReport.message` shows the worst rank and worker as a small table; ``assert_balanced`` raises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from lightning_patterns.testing.topology import JobTopology, ResumePoint

__all__ = ["BalanceReport", "RankBalance", "WorkerBalance"]


def _classes_cell(num_classes: int | None, short: Sequence[int]) -> str:
    """``"7/10 (missing 2, 5, 9)"``: the classes a row holds enough of, of the dataset's classes."""
    if num_classes is None:
        return "-"
    cell = f"{num_classes - len(short)}/{num_classes}"
    if short:
        cell += f" (missing {', '.join(map(str, short[:6]))}{', …' if len(short) > 6 else ''})"
    return cell


def _range(values: Sequence[int]) -> str:
    """``"3"`` or ``"0-7"``."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class WorkerBalance:
    """One DataLoader worker of one rank in one run.

    Args:
        run: ``0`` for the (stopping) job, ``1`` for the job that finished the epoch after a resume.
        rank: The global rank.
        node: The node running the rank.
        worker_id: The DataLoader worker (``0`` when ``num_workers=0``).
        samples: Samples the worker's plan yields.
        batches: Batches it yields: ``ceil(samples / batch_size)``.
        padded_repeats: Samples it yields that an earlier rank or worker of the same run (or the worker itself)
            already yields: the padding of ``drop_last=False``.
        shards_opened: Distinct shards it reads.
        class_counts: Per class, the samples it holds *for sure* given the per-shard label histograms (a worker
            reading part of a shard may hold more); ``None`` when the manifest records no histograms.
        class_quota: With ``min_per_class``, the samples of each class it needs: ``min_per_class`` per batch that
            can hold every class (a last batch smaller than ``min_per_class × classes`` is exempt); else ``0``.
    """

    run: int
    rank: int
    node: int
    worker_id: int
    samples: int
    batches: int
    padded_repeats: int
    shards_opened: int
    class_counts: tuple[int, ...] | None = None
    class_quota: int = 0

    def short_classes(self) -> tuple[int, ...]:
        """The classes it surely holds fewer of than it needs (``class_quota``, or one when there is none)."""
        if self.class_counts is None:
            return ()
        return tuple(k for k, count in enumerate(self.class_counts) if count < max(self.class_quota, 1))


@dataclass(frozen=True)
class RankBalance:
    """One rank in one run: the sum of its workers, and the classes it surely holds.

    Args:
        run: ``0`` for the (stopping) job, ``1`` for the job that finished the epoch after a resume.
        rank: The global rank.
        node: The node running it.
        samples: Samples the rank yields (all its workers).
        batches: Batches the rank yields: the sum over its workers.
        padded_repeats: The sum of its workers' padded repeats.
        class_counts: Per class, the samples the rank surely holds (see :class:`WorkerBalance`), or ``None``.
        workers: Its DataLoader workers.
    """

    run: int
    rank: int
    node: int
    samples: int
    batches: int
    padded_repeats: int
    class_counts: tuple[int, ...] | None
    workers: tuple[WorkerBalance, ...]

    @property
    def worker_spread(self) -> int:
        """Batches of the busiest worker minus those of the idlest."""
        batches = [worker.batches for worker in self.workers]
        return max(batches) - min(batches) if batches else 0


@dataclass(frozen=True)
class BalanceReport:
    """How a dataset splits over a job's ranks and workers in one epoch, and which invariants it breaks.

    Args:
        dataset: The dataset's URL, or a description of the manifest given.
        topology: The job checked (the stopping job, with a resume).
        epoch: The epoch checked.
        num_samples: Samples in the dataset.
        ranks: Every rank of every run, run 0 first.
        delivered: Samples the epoch delivers in all: with a resume, what the stopping job had yielded plus
            everything the finishing job yields.
        duplicates: Deliveries beyond the first of a sample.
        losses: Samples never delivered.
        expected_padding: The repeats the plan documents: ``world_size × per_rank − samples`` when positive,
            summed over the runs (``drop_last=False``).
        expected_dropped: The samples the plan documents as dropped (``drop_last=True``), summed over the runs.
        class_totals: Samples of each class in the dataset, from the manifest, or ``None``.
        resume: The resume point checked, if any.
        violations: One sentence per broken invariant; empty when the dataset is balanced.
    """

    dataset: str
    topology: JobTopology
    epoch: int
    num_samples: int
    ranks: tuple[RankBalance, ...]
    delivered: int
    duplicates: int
    losses: int
    expected_padding: int
    expected_dropped: int
    class_totals: tuple[int, ...] | None
    resume: ResumePoint | None
    violations: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every invariant holds."""
        return not self.violations

    @property
    def workers(self) -> tuple[WorkerBalance, ...]:
        """Every worker of every rank and run."""
        return tuple(worker for rank in self.ranks for worker in rank.workers)

    @property
    def batch_spread(self) -> int:
        """The largest difference in batches between two ranks of one run (``0`` when balanced)."""
        spread = 0
        for run in {rank.run for rank in self.ranks}:
            batches = [rank.batches for rank in self.ranks if rank.run == run]
            spread = max(spread, max(batches) - min(batches))
        return spread

    @property
    def worker_spread(self) -> int:
        """The largest difference in batches between two workers of one rank (at most 1 when balanced)."""
        return max((rank.worker_spread for rank in self.ranks), default=0)

    def missing_classes(self) -> dict[int, tuple[int, ...]]:
        """With ``min_per_class``: per rank of run 0 with a worker short of its quota of some class, those classes."""
        if self.topology.min_per_class is None or self.class_totals is None:
            return {}
        missing = {}
        for rank in self.ranks:
            if rank.run == 0:
                short = sorted({k for worker in rank.workers if worker.class_quota for k in worker.short_classes()})
                if short:
                    missing[rank.rank] = tuple(short)
        return missing

    def _rank_short(self, rank: RankBalance) -> tuple[int, ...]:
        """The classes of ``rank``'s classes cell: short of a quota with ``min_per_class``, else absent."""
        if rank.class_counts is None:
            return ()
        if self.topology.min_per_class is not None:
            return self.missing_classes().get(rank.rank, ()) if rank.run == 0 else ()
        return tuple(k for k, count in enumerate(rank.class_counts) if count == 0)

    def worst_rank(self) -> RankBalance | None:
        """The rank short of most classes, then furthest from the median batch count of its run."""
        if not self.ranks:
            return None
        runs = {run: median(r.batches for r in self.ranks if r.run == run) for run in {r.run for r in self.ranks}}
        return max(
            self.ranks,
            key=lambda r: (
                len(self._rank_short(r)) if self.topology.min_per_class is not None else 0,
                abs(r.batches - runs[r.run]),
                r.worker_spread,
                r.padded_repeats,
                -r.run,
                -r.rank,
            ),
        )

    def worst_worker(self) -> WorkerBalance | None:
        """The worker short of most classes, then furthest from its rank's others, then with the most repeats."""
        if not self.workers:
            return None
        middle = {(r.run, r.rank): median(w.batches for w in r.workers) for r in self.ranks if r.workers}
        return max(
            self.workers,
            key=lambda w: (
                len(w.short_classes()) if w.class_quota else 0,
                abs(w.batches - middle[w.run, w.rank]),
                w.padded_repeats,
                -w.run,
                -w.rank,
                -w.worker_id,
            ),
        )

    def table(self) -> str:
        """The worst rank and worker, and the range over all ranks, as a small table."""
        classes = None if self.class_totals is None else len(self.class_totals)
        head = ["", "run", "rank", "node", "worker", "samples", "batches", "padded", "classes"]
        rows: list[list[str]] = []
        rank = self.worst_rank()
        if rank is not None:
            workers = f"0-{len(rank.workers) - 1}" if len(rank.workers) > 1 else "0"
            cells = [rank.run, rank.rank, rank.node, workers, rank.samples, rank.batches, rank.padded_repeats]
            rows.append(["worst rank", *map(str, cells), _classes_cell(classes, self._rank_short(rank))])
        worker = self.worst_worker()
        if worker is not None:
            cells = [worker.run, worker.rank, worker.node, worker.worker_id, worker.samples, worker.batches]
            cells.append(worker.padded_repeats)
            rows.append(["worst worker", *map(str, cells), _classes_cell(classes, worker.short_classes())])
        if self.ranks:
            held = [classes - len(self._rank_short(r)) for r in self.ranks] if classes is not None else []
            columns = [
                [r.run for r in self.ranks],
                [r.rank for r in self.ranks],
                [r.node for r in self.ranks],
                [w.worker_id for w in self.workers] or [0],
                [r.samples for r in self.ranks],
                [r.batches for r in self.ranks],
                [r.padded_repeats for r in self.ranks],
            ]
            rows.append(["all ranks", *map(_range, columns), f"{_range(held)}/{classes}" if held else "-"])
        if self.resume is None:  # one run: the run column says nothing
            rows = [row[:1] + row[2:] for row in [head, *rows]]
            head, rows = rows[0], rows[1:]
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in [head, *rows]
        ]
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        """The first line of :meth:`message`: dataset, epoch, job and (with a resume) the finishing job."""
        resumed = f", resumed on {self.resume.topology.describe()}" if self.resume is not None else ""
        return (
            f"dataset {self.dataset} ({self.num_samples} samples), epoch {self.epoch}, "
            f"{self.topology.describe()}{resumed}"
        )

    def message(self) -> str:
        """The verdict, the violations one per line, and :meth:`table`."""
        verdict = "balanced" if self.ok else "NOT balanced"
        lines = [f"Shard balance: {verdict}: {self.summary()}."]
        lines += [f"  - {violation}" for violation in self.violations]
        lines += ["", self.table()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message()
