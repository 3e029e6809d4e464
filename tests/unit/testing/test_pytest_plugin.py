"""The pytest plugin, run inside pytest (pytester, in process): the lp_balance marker and lp_dataset / lp_topologies
fixtures as a user writes them, a failing check's table in the report, and one clear error per misuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards import Manifest, Schema, ShardInfo, publish_manifest, write_dataset
from lightning_patterns.testing.pytest_plugin import MARKER

pytest_plugins = ["pytester"]


@pytest.fixture
def datasets(tmp_path: Path) -> dict[str, str]:
    """A written dataset, and a manifest with a class too scarce to reach every rank (no planner can balance it)."""
    written = tmp_path / "written"
    write_dataset([{"x": np.float32(i)} for i in range(500)], str(written), shard_bytes=1024, progress=False)
    histograms = [(10, 0, 0, 0), (0, 10, 0, 0), (0, 0, 10, 0), (0, 0, 9, 1)]
    shards = tuple(
        ShardInfo(f"shard-{i}.lps", 10, 4096, "sha256:" + "0" * 64, label_counts={"label": counts})
        for i, counts in enumerate(histograms)
    )
    sorted_labels = Manifest(Schema.infer({"x": 1, "label": 1}), shards, {"rule": "size", "shard_bytes": 4096})
    publish_manifest(sorted_labels, str(tmp_path / "sorted"))
    return {"written": str(written), "sorted": str(tmp_path / "sorted")}


def test_the_marker_and_fixtures_check_a_grid(pytester: pytest.Pytester, datasets: dict[str, str]) -> None:
    pytester.makepyfile(
        test_grid=f"""
        import pytest
        from lightning_patterns.testing import JobTopology, assert_balanced

        @pytest.mark.{MARKER}({datasets["written"]!r}, world_sizes=range(1, 4), workers=[0, 2], batch_sizes=[1, 4],
                                drop_last=False, num_nodes=[1, 2])
        def test_written(lp_dataset, lp_topologies):
            assert lp_dataset.num_samples == 500
            # world sizes 1-3 x nodes 1-2 (only 2 divides by 2) x 2 worker counts x 2 batch sizes
            assert len(lp_topologies) == 4 * 2 * 2
            assert all(isinstance(t, JobTopology) and not t.drop_last for t in lp_topologies)
            assert {{(t.world_size, t.num_nodes) for t in lp_topologies}} == {{(1, 1), (2, 1), (2, 2), (3, 1)}}
            for topology in lp_topologies:
                assert_balanced(lp_dataset, topology)
        """,
        test_own_dataset=f"""
        import pytest
        from lightning_patterns.testing import assert_balanced

        @pytest.fixture
        def lp_dataset_url():
            return {datasets["sorted"]!r}

        @pytest.mark.{MARKER}(world_sizes=[2], batch_sizes=[4], min_per_class=1)
        def test_sorted_labels(lp_dataset, lp_topologies):
            assert len(lp_topologies) == 1 * 2 * 2  # the default workers (0, 2) and drop_last (False, True)
            for topology in lp_topologies:
                assert_balanced(lp_dataset, topology)
        """,
    )
    result = pytester.runpytest_inprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Shard balance: NOT balanced: dataset <manifest of 4 shards>*world_size=2*min_per_class=1.",
            "*rank*node*worker*samples*batches*padded*classes",
            "FAILED test_own_dataset.py::test_sorted_labels*",
        ]
    )


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines([f"@pytest.mark.{MARKER}(url=None, *, world_sizes=*"])


def test_misuse_is_explained(pytester: pytest.Pytester, datasets: dict[str, str]) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        def test_no_marker(lp_topologies):
            pass

        @pytest.mark.{MARKER}()
        def test_no_url(lp_dataset):
            pass

        @pytest.mark.{MARKER}({datasets["written"]!r}, world_size=[2])
        def test_misspelt(lp_topologies):
            pass

        @pytest.mark.{MARKER}({datasets["written"]!r}, workers=[])
        def test_empty(lp_topologies):
            pass

        @pytest.mark.{MARKER}({datasets["written"]!r}, world_sizes=[3], num_nodes=[2])
        def test_no_job(lp_topologies):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=5)
    result.stdout.fnmatch_lines_random(
        [
            f"*The lp_topologies fixture reads the @pytest.mark.{MARKER}(...) marker, but *test_no_marker has none*",
            f"*@pytest.mark.{MARKER} on *test_no_url names no dataset URL*override the lp_dataset_url fixture*",
            f"*@pytest.mark.{MARKER} on *test_misspelt has unknown keywords [[]'world_size'[]]*",
            f"*@pytest.mark.{MARKER}(workers=...) on *test_empty is empty*",
            "*gives no job: no world size in [[]3[]] is a multiple of a node count in [[]2[]]*",
        ]
    )


def test_the_plugin_is_registered_by_its_entry_point() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("lightning_patterns") == "lightning_patterns.testing.pytest_plugin", json.dumps(found)
