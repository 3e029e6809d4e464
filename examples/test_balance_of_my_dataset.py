"""A user's own property tests of shard balance, as in the README ("Property-testing your data").

Copy this file into your project's tests and point ``DATASET`` (or the ``lp_dataset_url`` fixture) at your data.
Here the test writes its own dataset first: 2,000 labelled samples of 10 classes in uneven shards. Only the
dataset's manifest is read by the checks, so they take milliseconds even for a dataset of terabytes.

Three ways to check it, from the quickest to write to the most thorough:

1. ``@pytest.mark.lp_balance`` and the ``lp_dataset`` / ``lp_topologies`` fixtures of the pytest plugin: a fixed
   grid of world sizes, DataLoader workers and batch sizes.
2. Hypothesis with ``strategies.topologies``: any job up to 64 ranks, shrunk to the smallest failing one.
3. The same across a resume on another cluster (``strategies.resume_points``): every sample still exactly once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

from lightning_patterns.data.shards import Manifest, write_dataset
from lightning_patterns.testing import JobTopology, ResumePoint, assert_balanced, check_balance
from lightning_patterns.testing import strategies as lps

NUM_SAMPLES = 2_000
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def lp_dataset_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The dataset under test. In your project, return your URL (``"s3://bucket/train"``) or put it in the marker."""
    url = str(tmp_path_factory.mktemp("data") / "train")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(NUM_SAMPLES, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=NUM_SAMPLES)
    samples = [{"image": images[i], "label": int(labels[i])} for i in range(NUM_SAMPLES)]
    write_dataset(samples, url, shard_bytes=16 * 1024, progress=False)
    return url


# 1. A grid, with the plugin's marker and fixtures.
@pytest.mark.lp_balance(world_sizes=[1, 2, 3, 8, 64], workers=[0, 1, 4], batch_sizes=[1, 32, 256])
def test_every_job_of_the_grid_is_balanced(lp_dataset: Manifest, lp_topologies: list[JobTopology]) -> None:
    for topology in lp_topologies:
        assert_balanced(lp_dataset, topology)


# 2. Any job Hypothesis can think of, up to 64 ranks of up to 8 DataLoader workers.
@settings(max_examples=50, deadline=None)
@given(topology=lps.topologies(max_world_size=64, max_workers=8, max_batch_size=512))
def test_my_dataset_is_balanced(lp_dataset_url: str, topology: JobTopology) -> None:
    assert_balanced(lp_dataset_url, topology)


# 3. An epoch stopped anywhere and finished on another cluster still delivers every sample exactly once.
jobs_with_resume = lps.topologies(max_world_size=16).flatmap(
    lambda topology: lps.resume_points(topology, max_world_size=16).map(lambda resume: (topology, resume))
)


@settings(max_examples=30, deadline=None)
@given(job=jobs_with_resume)
def test_resuming_on_another_cluster_is_exact(lp_dataset_url: str, job: tuple[JobTopology, ResumePoint]) -> None:
    topology, resume = job
    assert_balanced(lp_dataset_url, topology, resume=resume)


def test_the_report_shows_what_each_rank_gets(lp_dataset_url: str) -> None:
    """The report is there to read, too: samples, batches and padding per rank and worker."""
    report = check_balance(lp_dataset_url, JobTopology(world_size=3, num_workers=2, batch_size=32))
    assert report.ok, report.message()
    assert len({rank.batches for rank in report.ranks}) == 1
    assert report.duplicates == report.expected_padding <= 2
    assert report.losses == 0
    assert Path(lp_dataset_url, "manifest.json").exists()
