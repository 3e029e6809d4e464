"""Check that a dataset splits evenly over a job's ranks and DataLoader workers, from its manifest alone.

:func:`check_balance` plans one epoch of the dataset for a :class:`~lightning_patterns.testing.JobTopology`
(exactly as :class:`~lightning_patterns.data.streaming.StreamingDataset` does, with
:func:`~lightning_patterns.data.sharding.assignment.plan_epoch`), and checks these invariants:

1. **Equal batches per rank**: DDP never waits at the end of an epoch for a rank that ran out.
2. **Each sample exactly once, up to the documented padding**: with ``N`` samples, ``W`` ranks and ``P``
   samples per rank, ``drop_last=False`` repeats exactly ``W·P − N ≤ W − 1`` samples and loses none;
   ``drop_last=True`` drops exactly ``N − W·P ≤ W − 1`` and repeats none.
3. **Worker spread ≤ 1 batch** within every rank.
4. **Class coverage** when ``min_per_class`` is set: every DataLoader worker of every rank holds, of every
   class, ``min_per_class`` samples for each of its batches (:func:`class_quota`: a last batch smaller than
   ``min_per_class × classes`` is exempt, as the class balancer's tail), so every rank sees every class and
   can fill class-balanced batches. What a worker holds is counted from the manifest's per-shard label
   histograms (``label_counts``) as what it holds *for sure*: all of a shard's class ``k`` when it reads the
   whole shard, at least ``count_k − unread`` when it reads part of it, exactly when its plan reads shards in
   class order. A batch size smaller than ``min_per_class × classes`` is a violation too (StreamingDataset
   refuses it). A planner that plans classes gets the histograms and ``min_per_class`` (as StreamingDataset
   passes them); its refusal of a job is a violation.
5. **Exactly once across a resume** (with ``resume=``): the samples the stopping job had yielded plus all that
   the job finishing the epoch on another topology yields hold every sample once, up to the padding and
   dropping both plans document (a padding repeat the first job had not reached may be yielded by the second,
   and a sample the second drops may be such a repeat, so here the counts are bounds rather than equalities).

Only the manifest is read (one request for a URL); no shard body is fetched. Counting works on spans, so a
manifest with billions of samples checks as fast as a small one with as many shards.

:func:`assert_balanced` raises an ``AssertionError`` showing the worst rank and worker as a small table.

Example:
    >>> from lightning_patterns.data.shards import Manifest, Schema, ShardInfo
    >>> shards = tuple(ShardInfo(f"s{i}.lps", n, 4096 + 8 * n, "sha256:0") for i, n in enumerate([5, 0, 12, 3]))
    >>> manifest = Manifest(Schema.infer({"x": 1}), shards, {"rule": "size", "shard_bytes": 4096})
    >>> report = check_balance(manifest, JobTopology(world_size=3, num_workers=2, batch_size=2))
    >>> report.ok, report.duplicates, report.losses, [rank.batches for rank in report.ranks]
    (True, 1, 0, [4, 4, 4])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.sharding.assignment import PlanConfig, Span, WorkerPlan, plan_epoch
from lightning_patterns.data.shards.manifest import Manifest, load_manifest
from lightning_patterns.testing._intervals import DeliveredSet, union_length
from lightning_patterns.testing.balance_report import BalanceReport, RankBalance, WorkerBalance
from lightning_patterns.testing.topology import JobTopology, ResumePoint

__all__ = ["BalanceReport", "JobTopology", "Planner", "ResumePoint", "assert_balanced", "check_balance", "class_quota"]

_IntArray = npt.NDArray[np.int64]


class Planner(Protocol):
    """What :func:`check_balance` plans with: the signature of :func:`~lightning_patterns.data.sharding.plan_epoch`."""

    def __call__(
        self, config: PlanConfig, epoch: int, *, world_size: int, num_workers: int, resume: Sequence[Span] | None = None
    ) -> list[list[WorkerPlan]]:
        """Every worker's plan, indexed ``[rank][worker_id]``."""
        ...


def check_balance(
    dataset: str | os.PathLike[str] | Manifest,
    topology: JobTopology,
    *,
    epoch: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    resume: ResumePoint | None = None,
    label_field: str | None = None,
    planner: Planner = plan_epoch,
) -> BalanceReport:
    """Plan one epoch of ``dataset`` for ``topology`` and check every invariant of the module docstring.

    Args:
        dataset: The dataset root URL (any fsspec URL or local path) or its loaded
            :class:`~lightning_patterns.data.shards.Manifest`. Only the manifest is read.
        topology: The job: ranks, nodes, DataLoader workers, batch size, ``drop_last``, ``min_per_class``.
        epoch: The epoch to plan (it seeds the shuffle).
        storage_options: Passed to fsspec unchanged when ``dataset`` is a URL.
        resume: Stop the epoch at this point and finish it on ``resume.topology``; checks exactly-once across
            the two jobs.
        label_field: The label field whose ``label_counts`` the class check reads; by default ``"label"``, or
            the only label field the manifest records.
        planner: The planner to check (by default the one every ``StreamingDataset`` uses); a replacement takes
            :func:`~lightning_patterns.data.sharding.plan_epoch`'s arguments and returns ``[rank][worker]`` plans.

    Returns:
        The report; ``report.ok`` says whether every invariant holds, ``report.violations`` which do not.

    Raises:
        ValueError: ``min_per_class`` is set but the manifest records no label histograms for ``label_field``,
            or ``resume`` does not fit ``topology``.
        TypeError: ``dataset`` or ``topology`` is of the wrong type.
        ManifestError: The manifest at ``dataset`` is missing or invalid.
    """
    if not isinstance(topology, JobTopology):
        raise TypeError(
            f"check_balance(topology={topology!r}) takes a lightning_patterns.testing.JobTopology, e.g. "
            "JobTopology(world_size=8, num_workers=4, batch_size=32), or one drawn by strategies.topologies()."
        )
    manifest, name = _manifest(dataset, storage_options)
    sizes = np.asarray([shard.num_samples for shard in manifest.shards], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    histograms = _histograms(manifest, name, label_field, topology.min_per_class)
    shape = _Shape(sizes, offsets, histograms)
    violations: list[str] = []

    class_counts = None if histograms is None else histograms.tolist()
    too_small = _batch_violation(topology, histograms)
    if too_small:  # StreamingDataset refuses such a job before planning anything
        return _report(name, topology, epoch, total, histograms, resume, violations=(too_small,))
    try:
        plans = planner(
            topology.plan_config(sizes.tolist(), class_counts),
            epoch,
            world_size=topology.world_size,
            num_workers=topology.num_workers,
        )
    except ValueError as err:
        if topology.min_per_class is None:
            raise
        # A planner that plans classes refuses a job it cannot cover, as StreamingDataset does at construction.
        refused = (
            f"the plan refuses min_per_class={topology.min_per_class} for this job (as StreamingDataset would): {err}"
        )
        return _report(name, topology, epoch, total, histograms, resume, violations=(refused,))
    _check_plan_shape(plans, topology, "", violations)
    ranks = _run_rows(0, topology, plans, shape)
    delivered = _plan_intervals(plans)
    padding, dropped = _documented(total, topology)
    if resume is not None:
        yielded, remaining = _stop(plans, topology, resume)
        finishing = resume.topology
        plans_after = planner(
            finishing.plan_config(sizes.tolist(), class_counts),
            epoch,
            world_size=finishing.world_size,
            num_workers=finishing.num_workers,
            resume=remaining,
        )
        _check_plan_shape(plans_after, finishing, " of the job finishing the epoch", violations)
        violations += _order_violations(plans, plans_after)
        ranks += _run_rows(1, finishing, plans_after, shape)
        delivered = yielded + _plan_intervals(plans_after)
        more_padding, more_dropped = _documented(sum(stop - start for _, start, stop in remaining), finishing)
        padding, dropped = padding + more_padding, dropped + more_dropped

    count, outside, duplicates, losses = _delivery_counts(delivered, total)
    if outside:
        violations.append(f"{outside} samples delivered are outside the dataset's {total} (a planner bug)")
    report_ranks = tuple(ranks)
    violations += _rank_violations(report_ranks, topology)
    violations += _sample_violations(duplicates, losses, padding, dropped, exact=resume is None)
    report = _report(
        name,
        topology,
        epoch,
        total,
        histograms,
        resume,
        ranks=report_ranks,
        delivered=count,
        duplicates=duplicates,
        losses=losses,
        expected_padding=padding,
        expected_dropped=dropped,
    )
    violations += _class_violations(report)
    return replace(report, violations=tuple(violations))


def _delivery_counts(delivered: Sequence[tuple[int, int]], total: int) -> tuple[int, int, int, int]:
    """``(deliveries, outside the dataset, duplicates, losses)`` of the global intervals ``delivered``."""
    starts = np.asarray([a for a, _ in delivered], dtype=np.int64)
    stops = np.asarray([b for _, b in delivered], dtype=np.int64)
    count = int((stops - starts).sum())
    below = np.minimum(stops, 0) - np.minimum(starts, 0)
    above = np.maximum(stops, total) - np.maximum(starts, total)
    outside = int(below.sum() + above.sum())
    distinct = union_length(np.clip(starts, 0, total), np.clip(stops, 0, total))
    return count, outside, count - outside - distinct, total - distinct


def _order_violations(plans: list[list[WorkerPlan]], plans_after: list[list[WorkerPlan]]) -> list[str]:
    orders = {_class_sorted(plan) for rank_plans in (*plans, *plans_after) for plan in rank_plans}
    if len(orders) <= 1:
        return []
    return [
        "the job finishing the epoch reads shards in another sample order (class-sorted or file order) than the "
        "job that stopped: the positions its resume spans name would be other samples"
    ]


def _report(
    name: str,
    topology: JobTopology,
    epoch: int,
    total: int,
    histograms: npt.NDArray[np.int64] | None,
    resume: ResumePoint | None,
    **counts: Any,
) -> BalanceReport:
    fields: dict[str, Any] = {
        "ranks": (),
        "delivered": 0,
        "duplicates": 0,
        "losses": 0,
        "expected_padding": 0,
        "expected_dropped": 0,
        "violations": (),
    }
    return BalanceReport(
        dataset=name,
        topology=topology,
        epoch=epoch,
        num_samples=total,
        class_totals=None if histograms is None else tuple(int(v) for v in histograms.sum(axis=0)),
        resume=resume,
        **{**fields, **counts},
    )


def assert_balanced(
    dataset: str | os.PathLike[str] | Manifest,
    topology: JobTopology,
    *,
    epoch: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    resume: ResumePoint | None = None,
    label_field: str | None = None,
    planner: Planner = plan_epoch,
) -> BalanceReport:
    """:func:`check_balance`, raising ``AssertionError`` with the violations and the worst rank and worker.

    Returns:
        The report, when every invariant holds.

    Raises:
        AssertionError: An invariant is broken; the message shows which, and the worst rank and worker as a
            small table.
    """
    report = check_balance(
        dataset,
        topology,
        epoch=epoch,
        storage_options=storage_options,
        resume=resume,
        label_field=label_field,
        planner=planner,
    )
    if not report.ok:
        raise AssertionError(report.message())
    return report


# --- the manifest ---------------------------------------------------------------------------------


def _manifest(
    dataset: str | os.PathLike[str] | Manifest, storage_options: Mapping[str, Any] | None
) -> tuple[Manifest, str]:
    if isinstance(dataset, Manifest):
        return dataset, f"<manifest of {len(dataset.shards)} shards>"
    if isinstance(dataset, (str, os.PathLike)):
        url = os.fspath(dataset)
        return load_manifest(url, storage_options), url
    raise TypeError(
        f"check_balance(dataset={dataset!r}) takes a dataset URL (e.g. 's3://bucket/train') or a loaded "
        "lightning_patterns.data.shards.Manifest."
    )


def _histograms(
    manifest: Manifest, name: str, label_field: str | None, min_per_class: int | None
) -> npt.NDArray[np.int64] | None:
    """Per shard and class, the manifest's label counts (padded to the most classes), or ``None``."""
    recorded = sorted({field for shard in manifest.shards for field in shard.label_counts})
    field = (
        label_field
        if label_field is not None
        else ("label" if "label" in recorded or len(recorded) != 1 else recorded[0])
    )
    lacking = [shard.path for shard in manifest.shards if field not in shard.label_counts]
    if not lacking:
        classes = max((len(shard.label_counts[field]) for shard in manifest.shards), default=0)
        table = np.zeros((len(manifest.shards), classes), dtype=np.int64)
        for i, shard in enumerate(manifest.shards):
            counts = shard.label_counts[field]
            table[i, : len(counts)] = counts
        return table
    if min_per_class is None:
        return None
    found = f"; it records label_counts for {recorded}" if recorded else ""
    raise ValueError(
        f"check_balance with min_per_class={min_per_class} counts each rank's classes from the per-shard label "
        f"histograms in the manifest, but the manifest of {name} has none for label field {field!r} in shard "
        f"{lacking[0]!r}{f' and {len(lacking) - 1} more' if len(lacking) > 1 else ''}{found}. Write (or rewrite) "
        "the dataset with a lightning_patterns version that records `label_counts`, pass label_field= naming the "
        "recorded field, or set min_per_class=None."
    )


# --- one run's rows -------------------------------------------------------------------------------


class _Shape:
    """The dataset as spans see it: shard sizes, global offsets and label histograms."""

    def __init__(self, sizes: _IntArray, offsets: _IntArray, histograms: npt.NDArray[np.int64] | None) -> None:
        self.sizes = sizes
        self.offsets = offsets
        self.histograms = histograms

    def sure_counts(self, spans: Iterable[Span], class_sorted: bool = False) -> tuple[int, ...] | None:
        """Per class, the samples that ``spans`` surely hold.

        In file order the labels within a shard are unknown, so a part of ``L`` of its ``n`` samples surely holds
        ``count - (n - L)`` of a class (all of it for a whole shard). In class order (a plan whose spans count
        positions in each shard's samples sorted by label) positions ``[cum_c, cum_c+1)`` are class ``c``: exact.
        """
        if self.histograms is None:
            return None
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for shard, start, stop in spans:
            by_shard.setdefault(shard, []).append((start, stop))
        counts = np.zeros(self.histograms.shape[1], dtype=np.int64)
        for shard, runs in by_shard.items():
            if not 0 <= shard < len(self.sizes):
                continue  # reported as outside the dataset
            histogram = self.histograms[shard]
            if class_sorted:
                ends = np.cumsum(histogram)
                for start, stop in _merged(runs):
                    counts += np.clip(np.minimum(stop, ends) - np.maximum(start, ends - histogram), 0, None)
                continue
            read = runs[0][1] - runs[0][0] if len(runs) == 1 else union_length(*zip(*runs, strict=True))
            counts += np.maximum(histogram - (int(self.sizes[shard]) - read), 0)
        return tuple(int(v) for v in counts)


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` as sorted disjoint intervals."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(runs):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        elif stop > start:
            out.append((start, stop))
    return out


def _class_sorted(plan: WorkerPlan) -> bool:
    """Whether ``plan``'s spans count positions in class order (a planner that plans classes says so)."""
    return bool(getattr(plan, "class_sorted", False))


def _intervals(plan: WorkerPlan) -> list[tuple[int, int]]:
    return [
        (first, first + stop - start) for (_, start, stop), first in zip(plan.spans, plan.span_offsets, strict=True)
    ]


def _plan_intervals(plans: list[list[WorkerPlan]]) -> list[tuple[int, int]]:
    return [interval for rank_plans in plans for plan in rank_plans for interval in _intervals(plan)]


def class_quota(num_samples: int, batch_size: int, min_per_class: int, num_classes: int) -> int:
    """Samples of each class a worker yielding ``num_samples`` in batches of ``batch_size`` needs.

    ``min_per_class`` per batch that can hold ``min_per_class`` of every class: all its batches but a last one
    smaller than ``min_per_class × num_classes`` (the class balancer's documented tail).

    Example:
        >>> class_quota(70, 32, 2, 10), class_quota(84, 32, 2, 10), class_quota(0, 32, 2, 10)
        (4, 6, 0)
    """
    batches = -(-num_samples // batch_size)
    if not batches:
        return 0
    last = num_samples - (batches - 1) * batch_size
    return min_per_class * (batches - 1 + (last >= min_per_class * num_classes))


def _run_rows(run: int, topology: JobTopology, plans: list[list[WorkerPlan]], shape: _Shape) -> list[RankBalance]:
    seen = DeliveredSet()
    batch = topology.batch_size
    # Quotas are what run 0 (a whole epoch) must hold; a resumed run holds what remained.
    minimum = topology.min_per_class if run == 0 and shape.histograms is not None else None
    classes = 0 if shape.histograms is None else shape.histograms.shape[1]
    ranks = []
    for rank, rank_plans in enumerate(plans):
        node = topology.node_of(rank) if rank < topology.world_size else -1
        workers = []
        for worker_id, plan in enumerate(rank_plans):
            repeats = sum(seen.add(a, b) for a, b in _intervals(plan))
            workers.append(
                WorkerBalance(
                    run=run,
                    rank=rank,
                    node=node,
                    worker_id=worker_id,
                    samples=plan.num_samples,
                    batches=-(-plan.num_samples // batch),
                    padded_repeats=repeats,
                    shards_opened=plan.shards_opened,
                    class_counts=shape.sure_counts(plan.spans, _class_sorted(plan)),
                    class_quota=0 if minimum is None else class_quota(plan.num_samples, batch, minimum, classes),
                )
            )
        ranks.append(
            RankBalance(
                run=run,
                rank=rank,
                node=node,
                samples=sum(w.samples for w in workers),
                batches=sum(w.batches for w in workers),
                padded_repeats=sum(w.padded_repeats for w in workers),
                class_counts=shape.sure_counts(
                    [span for plan in rank_plans for span in plan.spans], any(map(_class_sorted, rank_plans))
                ),
                workers=tuple(workers),
            )
        )
    return ranks


def _check_plan_shape(plans: list[list[WorkerPlan]], topology: JobTopology, which: str, out: list[str]) -> None:
    workers = {len(rank_plans) for rank_plans in plans}
    if len(plans) != topology.world_size or workers - {topology.workers_per_rank}:
        out.append(
            f"the planner{which} returned plans for {len(plans)} ranks with {sorted(workers)} workers each; "
            f"expected {topology.world_size} ranks of {topology.workers_per_rank} workers"
        )


# --- resume ---------------------------------------------------------------------------------------


def _stop(
    plans: list[list[WorkerPlan]], topology: JobTopology, resume: ResumePoint
) -> tuple[list[tuple[int, int]], list[Span]]:
    """What the stopping job had yielded (global intervals), and the spans that remain (rank-major)."""
    flat = [plan for rank_plans in plans for plan in rank_plans]
    consumed = resume.consumed(topology, [plan.num_samples for plan in flat])
    yielded: list[tuple[int, int]] = []
    remaining: list[Span] = []
    for plan, count in zip(flat, consumed, strict=True):
        yielded += _yielded(plan, count)
        remaining += plan.remaining_spans(count)
    return yielded, remaining


def _yielded(plan: WorkerPlan, consumed: int) -> list[tuple[int, int]]:
    """The global intervals of the first ``consumed`` samples ``plan`` yields, computed from its read order.

    Whole windows of the within-worker shuffle are a prefix of the read order; only the window in progress is
    materialised (at most ``shuffle_window`` samples), so this never depends on ``remaining_spans``.
    """
    window = plan.shuffle_window
    whole = consumed if window <= 1 else (consumed // window) * window
    out: list[tuple[int, int]] = []
    position = 0
    for (_, start, stop), first in zip(plan.spans, plan.span_offsets, strict=True):
        length = stop - start
        take = min(length, whole - position)
        if take <= 0:
            break
        out.append((first, first + take))
        position += length
    if consumed > whole:
        out += [(int(i), int(i) + 1) for i in plan.indices_between(whole, consumed)]
    return out


# --- the invariants -------------------------------------------------------------------------------


def _documented(total: int, topology: JobTopology) -> tuple[int, int]:
    """``(padding, dropped)`` the plan documents for ``total`` samples on ``topology`` (see the docstring)."""
    w = topology.world_size
    per_rank = total // w if topology.drop_last else -(-total // w)
    return max(0, w * per_rank - total), max(0, total - w * per_rank)


def _rank_violations(ranks: Sequence[RankBalance], topology: JobTopology) -> list[str]:
    out = []
    for run in sorted({rank.run for rank in ranks}):
        rows = [rank for rank in ranks if rank.run == run]
        which = "" if run == 0 else " of the job finishing the epoch"
        batches = [rank.batches for rank in rows]
        if batches and max(batches) != min(batches):
            few = [r.rank for r in rows if r.batches == min(batches)]
            out.append(
                f"ranks{which} get different numbers of batches: {min(batches)} (rank {_some(few)}) to "
                f"{max(batches)}; DDP would wait at the end of the epoch for the ranks that ran out"
            )
        wide = [rank for rank in rows if rank.worker_spread > 1]
        if wide:
            worst = max(wide, key=lambda r: r.worker_spread)
            out.append(
                f"DataLoader workers{which} of {len(wide)} rank{'s' if len(wide) > 1 else ''} differ by more than 1 "
                f"batch: rank {worst.rank}'s "
                f"differ by {worst.worker_spread}"
            )
    return out


def _ranks(count: int) -> str:
    return "1 rank has" if count == 1 else f"{count} ranks have"


def _some(values: Sequence[int]) -> str:
    return ", ".join(map(str, values[:5])) + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def _sample_violations(duplicates: int, losses: int, padding: int, dropped: int, *, exact: bool) -> list[str]:
    out = []
    if (duplicates != padding) if exact else (duplicates > padding):
        expected = f"exactly {padding}" if exact else f"at most {padding}"
        out.append(f"{duplicates} samples are delivered more than once; the plan documents {expected} padding repeats")
    if (losses != dropped) if exact else (losses > dropped):
        expected = f"exactly {dropped}" if exact else f"at most {dropped}"
        out.append(f"{losses} samples are never delivered; the plan documents {expected} dropped (drop_last)")
    return out


def _batch_violation(topology: JobTopology, histograms: npt.NDArray[np.int64] | None) -> str:
    """Why ``topology``'s batches cannot hold ``min_per_class`` of every class, or ``""``."""
    minimum = topology.min_per_class
    if minimum is None or histograms is None or topology.batch_size >= minimum * histograms.shape[1]:
        return ""
    classes = histograms.shape[1]
    return (
        f"batch_size={topology.batch_size} cannot hold min_per_class={minimum} samples of each of {classes} classes "
        f"(StreamingDataset refuses it): raise batch_size to {minimum * classes} or lower min_per_class"
    )


def _class_violations(report: BalanceReport) -> list[str]:
    topology, totals = report.topology, report.class_totals
    minimum = topology.min_per_class
    if minimum is None or totals is None:
        return []
    short = [w for w in report.workers if w.run == 0 and w.class_quota and w.short_classes()]
    if not short:
        return []
    worst = max(short, key=lambda w: (len(w.short_classes()), -w.rank, -w.worker_id))
    lacking = worst.short_classes()
    held = ", ".join(f"{worst.class_counts[k] if worst.class_counts else 0} of class {k}" for k in lacking[:3])
    needed = sum(w.class_quota for w in report.workers if w.run == 0)
    scarce = [k for k in sorted({k for w in short for k in w.short_classes()}) if totals[k] < needed]
    hint = f"; classes {_some(scarce)} have fewer samples in the whole dataset than the workers need" if scarce else ""
    ranks = len({w.rank for w in short})
    return [
        f"{_ranks(ranks)} a worker short of some class for min_per_class={minimum}: rank {worst.rank} worker "
        f"{worst.worker_id} needs {worst.class_quota} of each class ({minimum} in each of its batches that can hold "
        f"every class) but surely holds only {held}{', …' if len(lacking) > 3 else ''}{hint}"
    ]
