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


def _classes_cell(counts: tuple[int, ...] | None, present: Sequence[int]) -> str:
    """``"7/10 (missing 2, 5, 9)"``: classes a row surely holds, of the classes the dataset has."""
    if counts is None:
        return "-"
    held = [k for k in present if counts[k] > 0]
    missing = [k for k in present if counts[k] == 0]
    cell = f"{len(held)}/{len(present)}"
    if missing:
        shown = ", ".join(map(str, missing[:6])) + (", …" if len(missing) > 6 else "")
        cell += f" (missing {shown})"
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
        """Per rank of run 0 that holds fewer than ``min_per_class`` samples of some class, those classes."""
        minimum = self.topology.min_per_class
        if minimum is None or self.class_totals is None:
            return {}
        present = self._present_classes()
        missing = {}
        for rank in self.ranks:
            if rank.run == 0 and rank.class_counts is not None:
                short = tuple(k for k in present if rank.class_counts[k] < minimum)
                if short:
                    missing[rank.rank] = short
        return missing

    def _present_classes(self) -> list[int]:
        return [k for k, total in enumerate(self.class_totals or ()) if total > 0]

    def worst_rank(self) -> RankBalance | None:
        """The rank furthest from the others: most classes missing, then furthest from the median batch count."""
        if not self.ranks:
            return None
        missing = self.missing_classes()
        runs = {run: median(r.batches for r in self.ranks if r.run == run) for run in {r.run for r in self.ranks}}
        return max(
            self.ranks,
            key=lambda r: (
                len(missing.get(r.rank, ())) if r.run == 0 else 0,
                abs(r.batches - runs[r.run]),
                r.worker_spread,
                r.padded_repeats,
                -r.run,
                -r.rank,
            ),
        )

    def worst_worker(self) -> WorkerBalance | None:
        """The worker furthest from its rank's others, then with the most padded repeats."""
        best: tuple[tuple[float, ...], WorkerBalance] | None = None
        for rank in self.ranks:
            middle = median(w.batches for w in rank.workers) if rank.workers else 0
            for worker in rank.workers:
                key = (
                    abs(worker.batches - middle),
                    worker.padded_repeats,
                    -worker.run,
                    -worker.rank,
                    -worker.worker_id,
                )
                if best is None or key > best[0]:
                    best = (key, worker)
        return None if best is None else best[1]

    def table(self) -> str:
        """The worst rank and worker, and the range over all ranks, as a small table."""
        present = self._present_classes()
        head = ["", "run", "rank", "node", "worker", "samples", "batches", "padded", "classes"]
        rows: list[list[str]] = []
        rank = self.worst_rank()
        if rank is not None:
            workers = f"0-{len(rank.workers) - 1}" if len(rank.workers) > 1 else "0"
            cells = [rank.run, rank.rank, rank.node, workers, rank.samples, rank.batches, rank.padded_repeats]
            rows.append(["worst rank", *map(str, cells), _classes_cell(rank.class_counts, present)])
        worker = self.worst_worker()
        if worker is not None:
            cells = [worker.run, worker.rank, worker.node, worker.worker_id, worker.samples, worker.batches]
            cells.append(worker.padded_repeats)
            rows.append(["worst worker", *map(str, cells), _classes_cell(worker.class_counts, present)])
        if self.ranks:
            held = [sum(1 for k in present if r.class_counts[k] > 0) for r in self.ranks if r.class_counts is not None]
            columns = [
                [r.run for r in self.ranks],
                [r.rank for r in self.ranks],
                [r.node for r in self.ranks],
                [w.worker_id for w in self.workers] or [0],
                [r.samples for r in self.ranks],
                [r.batches for r in self.ranks],
                [r.padded_repeats for r in self.ranks],
            ]
            classes = f"{_range(held)}/{len(present)}" if held else "-"
            rows.append(["all ranks", *map(_range, columns), classes])
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
