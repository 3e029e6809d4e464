"""Issue 16, item 6: class-balanced batches hold every class on every rank, or the dataset refuses to start.

The issue's case: shards split by label (``shards write --num-shards 10 --hash-key label``) read by 2 ranks gave
each rank 6 of the 10 classes, and every full batch lacked a class, silently (the class check looked only at
the whole dataset). The writer now records each shard's label histogram in the manifest and the plan spreads
the classes over every rank and DataLoader worker.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.commands.shards import run_shards_command
from lightning_patterns.data.shards import MANIFEST_NAME, load_manifest, write_dataset
from lightning_patterns.data.streaming import StreamingDataLoader, StreamingDataset
from lightning_patterns.exceptions import ClassCoverageError

N = 1408  # 704 samples per rank: 44 full batches of 16
BATCH = 16


class _Indexed:
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": np.int64(i), "image": np.full((2, 2), i % 256, np.uint8), "label": np.int64(self.labels[i])}


def _split_by_label(tmp_path: Path, labels: np.ndarray) -> str:
    """The issue's dataset: written, then re-sharded by the CLI with ``--num-shards 10 --hash-key label``."""
    source, dest = str(tmp_path / "source"), str(tmp_path / "by_label")
    write_dataset(_Indexed(labels), source, progress=False)
    argv = ["write", source, dest, "--num-shards", "10", "--hash-key", "label", "--no-progress"]
    assert run_shards_command(argv) == 0
    return dest


def _lacks_a_class(batch: dict[str, Any], k: int = 1) -> bool:
    return int(np.bincount(batch["label"].numpy(), minlength=10).min()) < k


def test_shards_split_by_label_give_every_rank_every_class(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 10, N)
    url = _split_by_label(tmp_path, labels)
    manifest = load_manifest(url)
    recorded = np.sum(
        [shard.label_counts["label"] + (0,) * (10 - len(shard.label_counts["label"])) for shard in manifest.shards],
        axis=0,
    )
    assert recorded.tolist() == np.bincount(labels, minlength=10).tolist()  # the writer recorded the histograms
    assert all(np.count_nonzero(shard.label_counts["label"]) <= 2 for shard in manifest.shards)

    # The issue, as it still is without class balancing: each rank misses classes, every full batch lacks one.
    for rank in range(2):
        batches = list(StreamingDataset(url, batch_size=BATCH, rank=rank, world_size=2))
        assert len(np.unique(np.concatenate([b["label"].numpy() for b in batches]))) < 10
        assert all(_lacks_a_class(b) for b in batches if len(b["label"]) == BATCH)

    # With min_per_class=1: every rank gets every class, every batch holds each class but a documented tail.
    for num_workers in (0, 2):
        seen: Counter[int] = Counter()
        counts = []
        for rank in range(2):
            dataset = StreamingDataset(
                url, batch_size=BATCH, shuffle=True, seed=3, min_per_class=1, rank=rank, world_size=2
            )
            # The histograms come from the manifest: construction read it and nothing else.
            assert dataset._reader.stats.bytes_read == len((Path(url) / MANIFEST_NAME).read_bytes())
            batches = list(StreamingDataLoader(dataset, num_workers=num_workers))
            counts.append(len(batches))
            rank_labels = np.concatenate([b["label"].numpy() for b in batches])
            assert set(rank_labels.tolist()) == set(range(10)), (rank, num_workers)
            short = [i for i, b in enumerate(batches) if _lacks_a_class(b)]
            assert len(short) <= max(num_workers, 1), (rank, num_workers, short)  # at most each worker's last
            seen.update(int(i) for b in batches for i in b["index"])
        assert counts[0] == counts[1] == N // 2 // BATCH
        assert seen == Counter(range(N))  # every sample exactly once (N splits evenly: no padding)


def test_histograms_are_read_from_the_labels_when_the_manifest_has_none(tmp_path: Path) -> None:
    labels = np.random.default_rng(1).integers(0, 10, N)
    url = _split_by_label(tmp_path, labels)
    path = Path(url) / MANIFEST_NAME
    data = json.loads(path.read_text())
    for entry in data["shards"]:
        del entry["label_counts"]  # as written before the writer recorded them
    path.write_text(json.dumps(data))
    dataset = StreamingDataset(url, batch_size=BATCH, min_per_class=1, rank=1, world_size=2)
    assert dataset.shard_class_counts().sum(axis=0).tolist() == np.bincount(labels, minlength=10).tolist()
    batches = list(dataset)
    assert set(np.concatenate([b["label"].numpy() for b in batches]).tolist()) == set(range(10))
    assert sum(_lacks_a_class(b) for b in batches) <= 1


def test_label_counts_that_disagree_with_the_shards_fail_naming_the_shard(tmp_path: Path) -> None:
    labels = np.random.default_rng(2).integers(0, 10, N)
    url = _split_by_label(tmp_path, labels)
    path = Path(url) / MANIFEST_NAME
    data = json.loads(path.read_text())
    entry = next(e for e in data["shards"] if np.count_nonzero(e["label_counts"]["label"]) == 2)
    counts = entry["label_counts"]["label"]
    a, b = np.flatnonzero(counts)[:2]
    counts[a], counts[b] = counts[b], counts[a]  # the same total: it passes the manifest's own checks
    path.write_text(json.dumps(data))
    dataset = StreamingDataset(url, batch_size=BATCH, min_per_class=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match=rf"{entry['path']} holds 'label' class counts \[.*\], but the plan was made"):
        list(dataset)


def test_a_dataset_that_cannot_be_balanced_fails_at_construction_naming_ranks_and_classes(tmp_path: Path) -> None:
    labels = np.random.default_rng(3).integers(0, 8, N)
    labels[:30] = 8  # class 8 is rare, class 9 has a single sample
    labels[30] = 9
    url = _split_by_label(tmp_path, labels)
    with pytest.raises(ClassCoverageError) as info:
        StreamingDataset(url, batch_size=BATCH, min_per_class=1, rank=0, world_size=2)
    message = str(info.value)
    assert "needs every DataLoader worker of every rank (world_size=2, num_workers=0)" in message
    # Each rank gets half of class 8 (30 samples) and one of them the single sample of class 9.
    assert re.search(
        r"rank 0: class 8 \(15 of 44\), class 9 \([01] of 44\); rank 1: class 8 \(15 of 44\), class 9", message
    )
    assert (
        "In all, class 8 has 30 samples and class 9 has 1 samples but 88 batches × min_per_class=1 need 88" in message
    )
    assert "Lower min_per_class or batch_size, use fewer ranks or workers, or add samples of class 8, 9." in message
