"""Property tests through the public strategies: each strategy draws what it promises, and the read plan keeps every
invariant `check_balance` checks, for any manifest, any job and any resume point on another cluster."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.data.sharding.assignment import PlanConfig, WorkerPlan, plan_epoch, samples_per_rank
from lightning_patterns.data.shards import FieldSpec, Manifest, Schema, read_shard, write_dataset
from lightning_patterns.testing import JobTopology, ResumePoint, assert_balanced, check_balance
from lightning_patterns.testing import strategies as lps

BOUNDS = {"min_shards": 2, "max_shards": 12, "min_samples": 5, "max_samples": 900}


@given(lps.uniform_shard_sizes(**BOUNDS))
def test_uniform_sizes_differ_by_at_most_one(sizes: list[int]) -> None:
    assert 2 <= len(sizes) <= 12
    assert 5 <= sum(sizes) <= 900
    assert max(sizes) - min(sizes) <= 1


@given(lps.skewed_shard_sizes(**BOUNDS))
def test_skewed_sizes_keep_to_the_bounds(sizes: list[int]) -> None:
    assert 2 <= len(sizes) <= 12
    assert 5 <= sum(sizes) <= 900
    assert min(sizes) >= 0


@given(lps.shard_sizes_with_empties(**BOUNDS))
def test_sizes_with_empties_hold_an_empty_and_a_filled_shard(sizes: list[int]) -> None:
    assert 2 <= len(sizes) <= 12
    assert 5 <= sum(sizes) <= 900
    assert 0 in sizes
    assert any(sizes)


@given(lps.one_giant_shard(**BOUNDS))
def test_one_giant_shard_holds_at_least_half(sizes: list[int]) -> None:
    assert 2 <= len(sizes) <= 12
    assert 5 <= sum(sizes) <= 900
    assert 2 * max(sizes) >= sum(sizes)


@given(lps.manifests(num_classes=st.integers(1, 12)))
def test_manifests_are_valid_and_histograms_sum_to_the_shards(manifest: Manifest) -> None:
    assert Manifest.from_json(manifest.to_json(), "memory://drawn") == manifest
    for shard in manifest.shards:
        assert sum(shard.label_counts["label"]) == shard.num_samples


@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.integers(1, 6), st.data())
def test_sorted_labels_give_each_class_one_run(sizes: list[int], classes: int, data: st.DataObject) -> None:
    """The "sorted" layout is the dataset sorted by label: a class's (non-empty) shards are consecutive."""
    histograms = data.draw(lps.label_histograms(sizes, classes, "sorted"))
    assert [sum(h) for h in histograms] == sizes
    filled = [h for h in histograms if sum(h)]
    for k in range(classes):
        holding = [i for i, h in enumerate(filled) if h[k]]
        assert holding == list(range(holding[0], holding[-1] + 1) if holding else [])


@given(lps.topologies(min_world_size=3, max_world_size=64, max_num_nodes=8, min_workers=1, max_workers=8))
def test_topologies_keep_to_their_bounds(topology: JobTopology) -> None:
    assert 3 <= topology.world_size <= 64
    assert 1 <= topology.num_nodes <= 8
    assert topology.world_size % topology.num_nodes == 0
    assert 1 <= topology.num_workers <= 8


_JOBS = lps.topologies(max_world_size=64, max_workers=8, max_batch_size=512, shuffle=None, seed=None)


@given(lps.manifests(), _JOBS)
def test_every_job_is_balanced(manifest: Manifest, topology: JobTopology) -> None:
    report = assert_balanced(manifest, topology)
    per_rank = samples_per_rank(manifest.num_samples, topology.world_size, topology.drop_last)
    assert {rank.samples for rank in report.ranks} == {per_rank}
    assert report.duplicates + report.losses <= topology.world_size - 1


@given(_JOBS.flatmap(lambda t: st.tuples(st.just(t), lps.resume_points(t, max_world_size=64, max_workers=8))))
def test_resume_points_fit_the_stopping_job(job: tuple[JobTopology, ResumePoint]) -> None:
    topology, resume = job
    assert all(0.0 <= fraction <= 1.0 for fraction in resume.progress)
    assert len(resume.progress) == topology.world_size * max(topology.num_workers, 1)
    assert resume.topology.batch_size == topology.batch_size
    assert resume.topology.drop_last == topology.drop_last


@given(lps.manifests(), _JOBS.flatmap(lambda t: st.tuples(st.just(t), lps.resume_points(t, max_world_size=64))))
def test_a_resume_keeps_every_sample_exactly_once_up_to_the_padding(
    manifest: Manifest, job: tuple[JobTopology, ResumePoint]
) -> None:
    topology, resume = job
    report = assert_balanced(manifest, topology, resume=resume)
    finishing = resume.topology
    assert report.duplicates <= (topology.world_size - 1) + (finishing.world_size - 1)
    assert report.losses <= (topology.world_size - 1) + (finishing.world_size - 1)


@given(lps.manifests(num_classes=st.integers(1, 10), label_layout="mixed"), lps.topologies(max_world_size=16))
def test_class_coverage_holds_when_every_shard_is_read_whole_and_mixed(
    manifest: Manifest, topology: JobTopology
) -> None:
    """What a rank surely holds is exact when it reads whole shards: it never exceeds the dataset's classes."""
    report = check_balance(manifest, topology)
    totals = np.asarray(report.class_totals)
    assert totals.sum() == manifest.num_samples
    for rank in report.ranks:
        assert rank.class_counts is not None
        assert (np.asarray(rank.class_counts) <= totals).all()
        assert sum(rank.class_counts) <= rank.samples


def file_order(config: PlanConfig, epoch: int, **kwargs: Any) -> list[list[WorkerPlan]]:
    """The plan in file order, without planning classes."""
    plain = PlanConfig(
        config.shard_sizes, batch_size=config.batch_size, seed=config.seed, shuffle=config.shuffle,
        drop_last=config.drop_last, shuffle_window=config.shuffle_window, span_samples=config.span_samples,
    )  # fmt: skip
    return plan_epoch(plain, epoch, **kwargs)


_CLASS_JOBS = lps.topologies(max_world_size=8, min_batch_size=15, min_per_class=st.integers(1, 3), shuffle=None)


@given(lps.manifests(lps.shard_sizes(max_shards=8, max_samples=300), num_classes=st.integers(1, 5)), _CLASS_JOBS)
def test_class_coverage_agrees_with_the_samples_each_worker_reads(manifest: Manifest, topology: JobTopology) -> None:
    """Recounted from every sample a worker reads: of a shard's class ``c`` it surely holds ``count - unread``, and
    it needs ``min_per_class`` for each of its batches of at least ``min_per_class × classes`` samples."""
    report = check_balance(manifest, topology, planner=file_order)
    sizes = np.asarray([shard.num_samples for shard in manifest.shards])
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    histograms = np.asarray([shard.label_counts["label"] for shard in manifest.shards])
    plans = file_order(topology.plan_config(sizes.tolist()), 0, world_size=topology.world_size,
                       num_workers=topology.num_workers)  # fmt: skip
    m, b = topology.min_per_class or 0, topology.batch_size
    missing: dict[int, set[int]] = {}
    for rank, rank_plans in enumerate(plans):
        for plan, row in zip(rank_plans, report.ranks[rank].workers, strict=True):
            read = plan.indices()
            unread = sizes - np.bincount(shard_of[read], minlength=len(sizes))
            sure = np.maximum(histograms - unread[:, None], 0).sum(axis=0)
            assert tuple(sure.tolist()) == row.class_counts
            batches = [min(b, plan.num_samples - start) for start in range(0, plan.num_samples, b)]
            quota = m * sum(size >= m * histograms.shape[1] for size in batches)
            assert row.class_quota == quota
            short = {int(k) for k in np.flatnonzero(sure < max(quota, 1))} if quota else set()
            if short:
                missing.setdefault(rank, set()).update(short)
    assert report.missing_classes() == {rank: tuple(sorted(ks)) for rank, ks in missing.items()}
    assert report.ok == (not missing)


@given(lps.manifests(lps.shard_sizes(max_shards=8, max_samples=300), num_classes=st.integers(1, 5)), _CLASS_JOBS)
def test_the_plan_keeps_every_other_invariant_with_min_per_class(manifest: Manifest, topology: JobTopology) -> None:
    """Whatever the planner does with classes, only the class check may fail; a planner that plans classes and
    accepts the job (rather than refusing it at construction) must cover every class."""
    report = check_balance(manifest, topology)
    class_related = ("a worker short of some class", "cannot hold min_per_class", "the plan refuses min_per_class")
    assert all(any(text in violation for text in class_related) for violation in report.violations), report.message()
    plans_classes = {"class_counts", "min_per_class"} <= {field.name for field in dataclasses.fields(PlanConfig)}
    refused = any("refuses" in violation for violation in report.violations)
    if plans_classes and not refused:
        assert report.ok, report.message()


_SCHEMA = Schema(
    {
        "image": FieldSpec("uint8", (3, 2)),
        "label": FieldSpec("int64", ()),
        "score": FieldSpec("float32", (2,)),
        "caption": FieldSpec("str", None),
        "blob": FieldSpec("bytes", None),
    }
)


@given(st.lists(lps.samples(_SCHEMA, num_classes={"label": 5}), min_size=1, max_size=20))
def test_samples_match_their_schema_and_round_trip_through_shards(samples: list[dict[str, Any]]) -> None:
    url = "memory://proptest-samples"
    manifest = write_dataset(samples, url, mode="overwrite", grace_period=0, progress=False)
    assert manifest.schema == _SCHEMA
    read = [row for shard in manifest.shards for row in read_shard(url, shard, schema=manifest.schema)]
    assert len(read) == len(samples)
    for wrote, got in zip(samples, read, strict=True):
        assert 0 <= int(wrote["label"]) < 5
        assert got["caption"] == wrote["caption"]
        assert got["blob"] == wrote["blob"]
        assert np.array_equal(np.asarray(got["image"]), wrote["image"])
        assert np.array_equal(np.asarray(got["score"]), wrote["score"])
