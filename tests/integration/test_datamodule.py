"""The DataModule under real Trainers: one process, DDP with 2 CPU processes, and mid-epoch checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards import load_manifest, write_dataset

SCRIPT = Path(__file__).parent / "scripts" / "fit_recording.py"
N = 700


class _Samples:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {
            "index": np.int64(i),
            "image": np.full((4, 4), i % 256, dtype=np.uint8),
            "label": np.int64(i % 10),
        }


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Hash-sharded by a skewed key so the shards are deliberately uneven."""
    url = str(tmp_path_factory.mktemp("uneven") / "data")
    write_dataset(_Samples(), url, num_shards=5, hash_key="label", progress=False)
    sizes = [shard.num_samples for shard in load_manifest(url).shards]
    assert max(sizes) > 1.5 * min(sizes), sizes
    return url


def _run(*args: str, timeout: float = 240) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted(out.glob("seen-rank*.json"))]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_over_uneven_shards_gives_every_rank_the_same_batches(uneven_dataset: str, tmp_path: Path) -> None:
    _run(uneven_dataset, str(tmp_path), "2")
    records = _records(tmp_path)
    assert len(records) == 2
    assert records[0]["batches_per_epoch"] == records[1]["batches_per_epoch"]
    seen = Counter(i for record in records for i in record["seen"])  # type: ignore[attr-defined]
    assert set(seen) == set(range(N))
    assert sum(seen.values()) - N <= 1


@pytest.mark.slow
@pytest.mark.distributed
def test_mid_epoch_checkpoint_resumes_exactly_on_another_world_size(uneven_dataset: str, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    # One process, checkpoint every 6 steps, stop after step 12 (mid-epoch: 44 batches in the epoch).
    _run(uneven_dataset, str(first), "1", "--save-every", "6", "--stop-at-step", "12")
    trained_before = _records(first)[0]["seen"][: 12 * 16]  # type: ignore[index]
    checkpoint = next(first.glob("*step=12*.ckpt"))
    # Resume the rest of the epoch on two DDP processes.
    _run(uneven_dataset, str(second), "2", "--ckpt", str(checkpoint))
    after = [i for record in _records(second) for i in record["seen"]]  # type: ignore[attr-defined]
    seen = Counter(trained_before + after)
    assert set(seen) == set(range(N))
    assert sum(seen.values()) - N <= 1


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_exactly_with_workers(uneven_dataset: str, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    _run(uneven_dataset, str(first), "1", "--save-every", "5", "--stop-at-step", "10", "--num-workers", "2")
    trained_before = _records(first)[0]["seen"][: 10 * 16]  # type: ignore[index]
    checkpoint = next(first.glob("*step=10*.ckpt"))
    _run(uneven_dataset, str(second), "1", "--ckpt", str(checkpoint), "--num-workers", "2")
    after = _records(second)[0]["seen"]
    seen = Counter(trained_before + after)  # type: ignore[operator]
    assert seen == Counter(range(N))


@pytest.mark.slow
@pytest.mark.distributed
def test_class_balanced_batches_under_ddp(tmp_path: Path) -> None:
    url = str(tmp_path / "balanced")
    # Split by label, as in issue 16: without the class-aware plan each rank would see only some classes.
    write_dataset(_Samples(), url, num_shards=4, hash_key="label", progress=False)
    assert all(np.count_nonzero(shard.label_counts["label"]) < 10 for shard in load_manifest(url).shards)
    _run(url, str(tmp_path), "2", "--min-per-class", "1")
    records = _records(tmp_path)
    assert records[0]["batches_per_epoch"] == records[1]["batches_per_epoch"]
    for record in records:
        counts = record["min_class_counts"]
        # Batches of 16 over 10 classes: every batch but a documented tail (the last) holds each class.
        assert all(count >= 1 for count in counts[:-1]), counts  # type: ignore[index]
    seen = Counter(i for record in records for i in record["seen"])  # type: ignore[attr-defined]
    assert set(seen) == set(range(N))
