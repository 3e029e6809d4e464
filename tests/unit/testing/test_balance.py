"""check_balance / assert_balanced: exact counts on known plans, every invariant caught on a broken planner, class
coverage from label histograms, resume, the assertion's table, the manifest as the only thing read, and the errors."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.sharding.assignment import PlanConfig, Span, WorkerPlan, plan_epoch
from lightning_patterns.data.shards import Manifest, Schema, ShardInfo, write_dataset
from lightning_patterns.testing import BalanceReport, JobTopology, ResumePoint, assert_balanced, check_balance
from lightning_patterns.testing.balance import class_quota
from lightning_patterns.testing.http_server import serve_directory

SCHEMA = Schema.infer({"x": 1, "label": 1})


def manifest_of(sizes: Sequence[int], histograms: Sequence[Sequence[int]] | None = None) -> Manifest:
    """A manifest with shards of ``sizes`` (and, optionally, their label histograms); no shard files."""
    shards = tuple(
        ShardInfo(
            f"shard-{i}.lps",
            n,
            4096 + 16 * n,
            "sha256:" + "0" * 64,
            label_counts={} if histograms is None else {"label": tuple(histograms[i])},
        )
        for i, n in enumerate(sizes)
    )
    return Manifest(SCHEMA, shards, {"rule": "size", "shard_bytes": 4096})


# ---------------------------------------------------------------- what a report holds


def test_a_known_plan_is_reported_exactly() -> None:
    """20 samples on 3 ranks of 2 workers, batch 2: 7 per rank (1 padding repeat), 4 batches each."""
    report = check_balance(manifest_of([5, 0, 12, 3]), JobTopology(world_size=3, num_workers=2, batch_size=2))
    assert report.ok, report.message()
    assert report.num_samples == 20
    assert [rank.samples for rank in report.ranks] == [7, 7, 7]
    assert [rank.batches for rank in report.ranks] == [4, 4, 4]
    assert [[w.samples for w in rank.workers] for rank in report.ranks] == [[4, 3], [4, 3], [4, 3]]
    assert (report.delivered, report.duplicates, report.losses) == (21, 1, 0)
    assert (report.expected_padding, report.expected_dropped) == (1, 0)
    assert [rank.padded_repeats for rank in report.ranks] == [0, 0, 1]  # the repeat is the last rank's
    assert (report.batch_spread, report.worker_spread) == (0, 0)  # 4 and 3 samples are 2 batches each
    assert report.class_totals is None
    assert report.ranks[0].class_counts is None


def test_drop_last_drops_exactly_the_documented_samples() -> None:
    report = check_balance(manifest_of([5, 0, 12, 3]), JobTopology(world_size=3, drop_last=True, batch_size=4))
    assert report.ok, report.message()
    assert [rank.samples for rank in report.ranks] == [6, 6, 6]
    assert (report.duplicates, report.losses, report.expected_dropped) == (0, 2, 2)


def test_nodes_number_their_ranks_in_order() -> None:
    report = check_balance(manifest_of([40]), JobTopology(world_size=8, num_nodes=2))
    assert [rank.node for rank in report.ranks] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_huge_manifest_is_checked_from_spans_alone() -> None:
    """Ten billion samples over 64 ranks of 8 workers: counting by span, not by sample, takes well under a second."""
    manifest = manifest_of([10**8 + i for i in range(100)])
    started = time.perf_counter()
    report = check_balance(manifest, JobTopology(world_size=64, num_workers=8, batch_size=512, shuffle=True))
    assert time.perf_counter() - started < 5
    assert report.ok, report.message()
    assert report.num_samples == 100 * 10**8 + sum(range(100))


# ---------------------------------------------------------------- a broken planner is caught


def _replace_plan(
    plans: list[list[WorkerPlan]], rank: int, worker: int, spans: list[Span], sizes: Sequence[int]
) -> None:
    offsets = np.cumsum(sizes) - np.asarray(sizes)
    plans[rank][worker] = dataclasses.replace(
        plans[rank][worker], spans=tuple(spans), span_offsets=tuple(int(offsets[s]) + a for s, a, _ in spans)
    )


def _planner(edit: Any) -> Any:
    """``plan_epoch``, then ``edit(plans, sizes)`` to break it."""

    def planner(config: PlanConfig, epoch: int, **kwargs: Any) -> list[list[WorkerPlan]]:
        plans = plan_epoch(config, epoch, **kwargs)
        edit(plans, config.shard_sizes)
        return plans

    return planner


SIZES = [10, 10, 10, 10]  # 40 samples, 10 per rank on 4 ranks: shard r is rank r's


@pytest.mark.parametrize(
    ("edit", "violations"),
    [
        pytest.param(
            lambda plans, sizes: _replace_plan(plans, 1, 0, [(1, 0, 1)], sizes),
            [r"ranks get different numbers of batches: 3 \(rank 1\) to 5", r"5 samples are never delivered"],
            id="a rank loses samples",
        ),
        pytest.param(
            lambda plans, sizes: _replace_plan(plans, 2, 0, [(1, 0, 6)], sizes),
            [r"6 samples are delivered more than once; the plan documents exactly 0", r"6 samples are never delivered"],
            id="a rank reads another's samples",
        ),
        pytest.param(
            lambda plans, sizes: (
                _replace_plan(plans, 3, 0, [(3, 0, 10)], sizes),
                _replace_plan(plans, 3, 1, [], sizes),
            ),
            [r"DataLoader workers of 1 rank differ by more than 1 batch: rank 3's differ by 5"],
            id="one worker gets everything",
        ),
        pytest.param(
            lambda plans, sizes: _replace_plan(plans, 0, 1, [(0, 0, 10), (3, 5, 15)], sizes),
            [r"5 samples delivered are outside the dataset's 40"],
            id="a span past the dataset's end",
        ),
        pytest.param(
            lambda plans, sizes: plans.pop(),
            [r"the planner returned plans for 3 ranks with \[2\] workers each; expected 4 ranks of 2 workers"],
            id="a rank has no plan",
        ),
    ],
)
def test_every_invariant_catches_a_broken_planner(edit: Any, violations: list[str]) -> None:
    topology = JobTopology(world_size=4, num_workers=2, batch_size=2)
    assert check_balance(manifest_of(SIZES), topology).ok  # the real planner is fine
    report = check_balance(manifest_of(SIZES), topology, planner=_planner(edit))
    assert not report.ok
    for pattern in violations:
        assert any(re.search(pattern, found) for found in report.violations), (pattern, report.violations)
    with pytest.raises(AssertionError, match=re.escape(report.violations[0])):
        assert_balanced(manifest_of(SIZES), topology, planner=_planner(edit))


def test_the_assertion_shows_the_worst_rank_and_worker_as_a_table() -> None:
    """Rank 2's third worker gets nothing: rank 2 is 1 batch short, and that worker 2 batches behind its peers."""
    broken = _planner(lambda plans, sizes: _replace_plan(plans, 2, 2, [], sizes))
    topology = JobTopology(world_size=4, num_workers=3, batch_size=2)
    with pytest.raises(AssertionError) as info:
        assert_balanced(manifest_of(SIZES), topology, planner=broken)
    message = str(info.value)
    assert message.startswith(
        "Shard balance: NOT balanced: dataset <manifest of 4 shards> (40 samples), epoch 0, world_size=4, "
        "num_workers=3, batch_size=2, drop_last=False."
    )
    lines = message.splitlines()
    assert "  - ranks get different numbers of batches: 4 (rank 2) to 5; DDP would wait" in message
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "node"])
    assert lines[header].split() == ["rank", "node", "worker", "samples", "batches", "padded", "classes"]
    assert lines[header + 1].split() == ["worst", "rank", "2", "0", "0-2", "8", "4", "0", "-"]
    assert lines[header + 2].split() == ["worst", "worker", "2", "0", "2", "0", "0", "0", "-"]
    assert lines[header + 3].split() == ["all", "ranks", "0-3", "0", "0-2", "8-10", "4-5", "0", "-"]


# ---------------------------------------------------------------- classes


def file_order(config: PlanConfig, epoch: int, **kwargs: Any) -> list[list[WorkerPlan]]:
    """The plan in file order, without planning classes: what these tests check is the class check itself."""
    plain = PlanConfig(
        config.shard_sizes,
        batch_size=config.batch_size,
        seed=config.seed,
        shuffle=config.shuffle,
        drop_last=config.drop_last,
        shuffle_window=config.shuffle_window,
        span_samples=config.span_samples,
    )
    return plan_epoch(plain, epoch, **kwargs)


def test_a_rank_missing_classes_is_named_with_the_worker_and_what_it_holds() -> None:
    """Shards sorted by label (as `--hash-key label` makes them): each of 2 ranks sees half of the classes."""
    manifest = manifest_of(SIZES, [[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    topology = JobTopology(world_size=2, batch_size=4, min_per_class=1)
    report = check_balance(manifest, topology, planner=file_order)
    assert report.class_totals == (10, 10, 10, 10)
    # Each rank's one worker yields 20 samples in 5 batches of 4: it needs 1 of each class in each.
    assert [worker.class_quota for worker in report.workers] == [5, 5]
    assert [rank.class_counts for rank in report.ranks] == [(10, 10, 0, 0), (0, 0, 10, 10)]
    assert report.missing_classes() == {0: (2, 3), 1: (0, 1)}
    assert report.violations == (
        "2 ranks have a worker short of some class for min_per_class=1: rank 0 worker 0 needs 5 of each class (1 in "
        "each of its batches that can hold every class) but surely holds only 0 of class 2, 0 of class 3",
    )
    assert "2/4 (missing 2, 3)" in report.table()
    # Without min_per_class the classes are reported, not required.
    assert check_balance(manifest, JobTopology(world_size=2), planner=file_order).ok


def test_a_tail_batch_too_small_for_every_class_needs_none() -> None:
    """20 samples in batches of 8: 2 full batches need 2 of each class; the last batch of 4 < 2 × 4 is exempt."""
    assert class_quota(20, 8, 2, 4) == 4
    assert class_quota(24, 8, 2, 4) == 6  # a last batch of 8 = 2 × 4 can hold them all
    assert class_quota(0, 8, 2, 4) == 0
    topology = JobTopology(batch_size=8, min_per_class=2)
    assert check_balance(manifest_of([20], [[5, 5, 5, 5]]), topology, planner=file_order).ok
    short = check_balance(manifest_of([20], [[6, 6, 5, 3]]), topology, planner=file_order)
    assert short.missing_classes() == {0: (3,)}  # needs 4 of each (2 × 2 batches), holds 3 of class 3


def test_a_batch_too_small_for_every_class_is_refused() -> None:
    manifest = manifest_of([20], [[5, 5, 5, 5]])
    report = check_balance(manifest, JobTopology(batch_size=7, min_per_class=2), planner=file_order)
    assert report.violations == (
        "batch_size=7 cannot hold min_per_class=2 samples of each of 4 classes (StreamingDataset refuses it): raise "
        "batch_size to 8 or lower min_per_class",
    )


def test_classes_count_only_what_a_partial_shard_surely_holds() -> None:
    """Rank 0 reads 6 of shard 0's 10 samples: of its 5 + 5 it surely holds 1 of each class, not 5."""
    manifest = manifest_of([10, 10], [[5, 5], [5, 5]])
    break_rank_0 = _planner(lambda plans, sizes: (_replace_plan(plans, 0, 0, [(0, 0, 6)], sizes),))
    report = check_balance(
        manifest, JobTopology(world_size=2, drop_last=True, batch_size=4, min_per_class=2), planner=break_rank_0
    )
    assert report.ranks[0].class_counts == (1, 1)
    assert report.ranks[0].workers[0].class_quota == 2  # batches of 4 and 2: only the first can hold 2 + 2
    assert report.missing_classes() == {0: (0, 1)}
    assert report.ranks[1].class_counts == (5, 5)


def test_a_class_too_scarce_for_every_worker_is_called_out() -> None:
    manifest = manifest_of([10, 10], [[9, 1], [10, 0]])
    report = check_balance(manifest, JobTopology(world_size=2, batch_size=2, min_per_class=1), planner=file_order)
    assert report.missing_classes() == {0: (1,), 1: (1,)}
    assert "classes 1 have fewer samples in the whole dataset than the workers need" in report.violations[0]


def test_min_per_class_without_label_histograms_is_explained() -> None:
    with pytest.raises(
        ValueError, match=r"min_per_class=1 counts each rank's classes from the per-shard label"
    ) as info:
        check_balance(manifest_of(SIZES), JobTopology(min_per_class=1))
    assert "has none for label field 'label' in shard 'shard-0.lps' and 3 more" in str(info.value)
    assert "records `label_counts`" in str(info.value)
    labelled = manifest_of([3], [[1, 2]])
    with pytest.raises(ValueError, match=r"for label field 'y'.*it records label_counts for \['label'\]"):
        check_balance(labelled, JobTopology(min_per_class=1), label_field="y")


# ---------------------------------------------------------------- resume


def test_a_resume_on_another_topology_delivers_every_sample_once() -> None:
    manifest = manifest_of([7, 0, 13, 4, 9])
    topology = JobTopology(world_size=3, num_workers=2, batch_size=2)
    resume = ResumePoint((0.5, 1.0, 0.0, 0.25, 0.9, 1.0), JobTopology(world_size=5, num_workers=3, batch_size=2))
    report = assert_balanced(manifest, topology, resume=resume)
    assert {rank.run for rank in report.ranks} == {0, 1}
    assert len([rank for rank in report.ranks if rank.run == 1]) == 5
    assert report.losses == 0
    assert report.duplicates <= report.expected_padding
    assert "run" in report.table().splitlines()[0].split()


def test_a_resume_that_loses_samples_is_caught() -> None:
    def lossy(config: PlanConfig, epoch: int, *, resume: Sequence[Span] | None = None, **kwargs: Any) -> Any:
        return plan_epoch(config, epoch, resume=None if resume is None else list(resume)[1:], **kwargs)

    manifest = manifest_of([7, 0, 13, 4, 9])
    topology = JobTopology(world_size=3, num_workers=2)
    resume = ResumePoint((0.5,) * 6, JobTopology(world_size=2))
    report = check_balance(manifest, topology, resume=resume, planner=lossy)
    assert any(
        re.search(r"samples are never delivered; the plan documents at most 0 dropped", v) for v in report.violations
    )


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: JobTopology(world_size=0), ValueError, r"JobTopology\(world_size=0\) must be an integer >= 1"),
        (lambda: JobTopology(world_size=6, num_nodes=4), ValueError, r"world_size must be a multiple of num_nodes"),
        (lambda: JobTopology(num_workers=-1), ValueError, r"JobTopology\(num_workers=-1\) must be an integer >= 0"),
        (lambda: JobTopology(batch_size=True), ValueError, r"JobTopology\(batch_size=True\) must be an integer"),
        (lambda: JobTopology(min_per_class=0), ValueError, r"min_per_class=0\) must be an integer >= 1; use None"),
        (lambda: JobTopology(seed=-1), ValueError, r"JobTopology\(seed=-1\)"),
        (lambda: JobTopology(span_samples=0), ValueError, r"JobTopology\(span_samples=0\)"),
        (lambda: ResumePoint((0.5, 1.5), JobTopology()), ValueError, r"got progress\[1\]=1\.5"),
        (
            lambda: check_balance(
                manifest_of(SIZES), JobTopology(world_size=2), resume=ResumePoint((1.0,), JobTopology())
            ),
            ValueError,
            r"ResumePoint has 1 progress fractions, but the stopping job \(world_size=2, .*\) has 2 workers",
        ),
        (
            lambda: check_balance(manifest_of(SIZES), {"world_size": 2}),
            TypeError,
            r"takes a lightning_patterns\.testing\.JobTopology",
        ),
        (lambda: check_balance(42, JobTopology()), TypeError, r"check_balance\(dataset=42\) takes a dataset URL"),
    ],
)
def test_invalid_arguments_are_explained(build: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()


# ---------------------------------------------------------------- from the manifest alone


def test_a_dataset_url_is_checked_by_reading_its_manifest_alone(tmp_path: Path) -> None:
    root = tmp_path / "train"
    samples = [{"x": np.float32(i), "label": i % 3} for i in range(300)]
    manifest = write_dataset(samples, str(root), shard_bytes=1024, progress=False)
    assert len(manifest.shards) > 3
    with serve_directory(tmp_path) as server:
        report = check_balance(server.url_for("train"), JobTopology(world_size=4, num_workers=2, batch_size=8))
        paths = sorted({request.path for request in server.requests})
    assert isinstance(report, BalanceReport)
    assert report.ok, report.message()
    assert report.num_samples == 300
    assert report.dataset == server.url_for("train")
    assert paths == ["/train/manifest.json"], f"check_balance read more than the manifest: {paths}"


# ---------------------------------------------------------------- a planner that plans classes


@dataclasses.dataclass(frozen=True)
class _ClassSortedPlan(WorkerPlan):
    """A plan whose spans count positions in each shard's class order (its samples sorted by label)."""

    class_sorted: bool = True


def _class_sorted(config: PlanConfig, epoch: int, **kwargs: Any) -> list[list[WorkerPlan]]:
    plans = file_order(config, epoch, **kwargs)
    fields = [f.name for f in dataclasses.fields(WorkerPlan) if f.name != "class_sorted"]
    return [
        [_ClassSortedPlan(**{name: getattr(p, name) for name in fields}, class_sorted=True) for p in r] for r in plans
    ]


def test_class_sorted_spans_are_counted_exactly() -> None:
    """Half a shard of 5 + 5 holds 0 of a class for sure in file order, but exactly 5 and 0 in class order."""
    manifest = manifest_of([10, 10], [[5, 5], [5, 5]])
    topology = JobTopology(world_size=4, batch_size=2, min_per_class=1)
    plain = check_balance(manifest, topology, planner=file_order)
    assert [rank.class_counts for rank in plain.ranks] == [(0, 0)] * 4
    assert set(plain.missing_classes()) == {0, 1, 2, 3}
    exact = check_balance(manifest, topology, planner=_class_sorted)
    assert [rank.class_counts for rank in exact.ranks] == [(5, 0), (0, 5), (5, 0), (0, 5)]
    assert exact.missing_classes() == {0: (1,), 1: (0,), 2: (1,), 3: (0,)}


def test_a_resume_that_changes_the_sample_order_is_caught() -> None:
    def mixed(config: PlanConfig, epoch: int, *, resume: Sequence[Span] | None = None, **kwargs: Any) -> Any:
        return (
            _class_sorted(config, epoch, **kwargs)
            if resume is None
            else plan_epoch(config, epoch, resume=resume, **kwargs)
        )

    resume = ResumePoint((0.5, 0.5), JobTopology(world_size=3))
    report = check_balance(manifest_of([10, 10]), JobTopology(world_size=2), resume=resume, planner=mixed)
    assert any("reads shards in another sample order" in violation for violation in report.violations)


def test_a_plan_that_refuses_min_per_class_is_a_violation() -> None:
    def refusing(config: PlanConfig, epoch: int, **kwargs: Any) -> list[list[WorkerPlan]]:
        raise ValueError("ranks 0, 1 would get too few samples of classes 2, 3")

    manifest = manifest_of(SIZES, [[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    report = check_balance(manifest, JobTopology(world_size=2, batch_size=4, min_per_class=1), planner=refusing)
    assert report.violations == (
        "the plan refuses min_per_class=1 for this job (as StreamingDataset would): ranks 0, 1 would get too few "
        "samples of classes 2, 3",
    )
    assert report.ranks == ()
    assert "Shard balance: NOT balanced" in report.message()
    with pytest.raises(ValueError, match="too few samples"):  # without min_per_class it is the planner's own error
        check_balance(manifest, JobTopology(world_size=2, batch_size=4), planner=refusing)


def test_the_plan_config_takes_the_histograms_when_the_planner_plans_classes() -> None:
    config = JobTopology(world_size=2, batch_size=8, min_per_class=2).plan_config([3, 4], [[1, 2], [4, 0]])
    assert config.shard_sizes == (3, 4)
    assert config.batch_size == 8
    planned = {f.name for f in dataclasses.fields(PlanConfig)}
    if {"class_counts", "min_per_class"} <= planned:  # the planner assigns spans by class: it is told how
        assert config.min_per_class == 2
        assert [list(row) for row in config.class_counts] == [[1, 2], [4, 0]]
    else:
        assert config == PlanConfig([3, 4], batch_size=8)
    assert JobTopology(batch_size=8).plan_config([3, 4], [[1, 2], [4, 0]]) == PlanConfig([3, 4], batch_size=8)
