"""``lightning-patterns shards check``: "holds for N examples" on a balanced dataset; the shrunk worst case, a command
to reproduce it and exit status 1 on a violation; usage errors with status 2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import find

from lightning_patterns.commands.shards import run_shards_command
from lightning_patterns.data.shards import publish_manifest, write_dataset
from lightning_patterns.testing import strategies as lps


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run_shards_command(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("balanced") / "train")
    write_dataset([{"x": np.float32(i)} for i in range(1000)], url, shard_bytes=1024, progress=False)
    return url


@pytest.fixture(scope="module")
def scarce(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A manifest (no shard files) drawn by the public strategies: 6 shards of 10, one class with a single sample."""
    manifest = find(
        lps.manifests(
            lps.uniform_shard_sizes(min_shards=6, max_shards=6, min_samples=60, max_samples=60),
            num_classes=3,
            label_layout="mixed",
        ),
        lambda m: sum(shard.label_counts["label"][2] for shard in m.shards) == 1,
    )
    url = str(tmp_path_factory.mktemp("scarce") / "train")
    publish_manifest(manifest, url)
    return url


def test_a_balanced_dataset_holds_for_every_example(capsys: pytest.CaptureFixture[str], balanced: str) -> None:
    code, out, err = run(
        capsys,
        "check",
        balanced,
        "--world-size",
        "1-64",
        "--workers",
        "0-8",
        "--batch-size",
        "1-512",
        "--max-examples",
        "40",
    )
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith(f"checking {balanced} (")
    assert "world_size 1-64, num_nodes 1, workers 0-8, batch_size 1-512, drop_last both" in out
    assert out.splitlines()[-1] == "holds for 40 examples"


def test_a_small_search_space_reports_how_many_jobs_it_tried(capsys: pytest.CaptureFixture[str], balanced: str) -> None:
    """Two world sizes, one worker count, one batch size, both drop_last: 4 jobs exist, so at most 4 are tried."""
    code, out, _ = run(
        capsys, "check", balanced, "--world-size", "1-2", "--workers", "0", "--batch-size", "8", "--max-examples", "50"
    )
    assert code == 0
    tried = int(re.fullmatch(r"holds for (\d+) examples", out.splitlines()[-1]).group(1))  # type: ignore[union-attr]
    assert 1 <= tried <= 50


def test_resume_and_nodes_are_searched_too(capsys: pytest.CaptureFixture[str], balanced: str) -> None:
    code, out, _ = run(
        capsys,
        "check",
        balanced,
        "--world-size",
        "1-16",
        "--num-nodes",
        "1-4",
        "--resume",
        "--shuffle",
        "--seed",
        "3",
        "--max-examples",
        "25",
    )
    assert code == 0
    assert "num_nodes 1-4" in out
    assert "with resume" in out
    assert out.splitlines()[-1] == "holds for 25 examples"


def test_a_violation_prints_the_shrunk_worst_case(capsys: pytest.CaptureFixture[str], scarce: str) -> None:
    """One sample of class 2 cannot be in every batch: the smallest job that shows it is one rank, batch size 3."""
    code, out, _ = run(capsys, "check", scarce, "--world-size", "1-64", "--batch-size", "3-64", "--min-per-class", "1")
    assert code == 1
    assert "violated; the shrunk worst case:" in out
    assert (
        f"Shard balance: NOT balanced: dataset {scarce} (60 samples), epoch 0, world_size=1, num_workers=0, "
        "batch_size=3, drop_last=False, min_per_class=1." in out
    )
    assert re.search(r"\n +rank +node +worker +samples +batches +padded +classes\n", out)
    assert f"reproduce: lightning-patterns shards inspect {scarce} --world-size 1 --num-workers 0 --batch-size 3" in out
    # Without --min-per-class the same dataset is balanced.
    assert run(capsys, "check", scarce, "--world-size", "1-8", "--max-examples", "20")[0] == 0


def test_too_small_a_batch_for_every_class_is_the_worst_case(capsys: pytest.CaptureFixture[str], scarce: str) -> None:
    code, out, _ = run(capsys, "check", scarce, "--min-per-class", "1")
    assert code == 1
    assert "batch_size=1 cannot hold min_per_class=1 samples of each of 3 classes" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--world-size", "x"], 2, r"argument --world-size: expected N or LOW-HIGH \(e\.g\. 1-64\), got 'x'"),
        (["--world-size", "8-4"], 2, r"expected 1 <= LOW <= HIGH, got '8-4'"),
        (["--workers", "-1"], 2, r"argument --workers: expected N or LOW-HIGH"),
        (["--max-examples", "0"], 2, r"argument --max-examples: expected an integer >= 1, got 0"),
        (
            ["--world-size", "3", "--num-nodes", "2"],
            2,
            r"no world size in --world-size 3 is a multiple of a node count",
        ),
        (
            ["--min-per-class", "1"],
            1,
            r"min_per_class=1 counts each rank's classes from the per-shard label histograms",
        ),
    ],
)
def test_errors_are_explained(
    capsys: pytest.CaptureFixture[str], balanced: str, argv: list[str], code: int, message: str
) -> None:
    got, _, err = run(capsys, "check", balanced, *argv)
    assert got == code
    assert re.search(message, err), err


def test_a_missing_dataset_is_explained(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "nothing"))
    assert code == 1
    assert "No dataset manifest at" in err
