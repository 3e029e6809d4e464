"""Class-balanced batches from a streamed dataset: at least k of every class per batch, each sample once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.options import ClassBalance

N = 2000
BATCH = 40
K = 2


def _short_of_k(batch: dict[str, Any]) -> bool:
    counts = np.bincount(batch["label"].numpy(), minlength=10)
    return bool(counts.min() < K)


def _balanced(url: str, rank: int = 0, world_size: int = 1, **kwargs: Any) -> StreamingDataset:
    return StreamingDataset(
        url,
        batch_size=BATCH,
        shuffle=True,
        seed=2,
        min_per_class=K,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_batch_holds_k_of_each_class_and_every_sample_once(
    make_dataset: Callable[..., str], world_size: int, num_workers: int
) -> None:
    url = make_dataset(N, num_shards=6)
    seen: Counter[int] = Counter()
    counts = []
    for rank in range(world_size):
        batches = list(StreamingDataLoader(_balanced(url, rank, world_size), num_workers=num_workers))
        counts.append(len(batches))
        # Only a documented tail may fall short: here, at most the last batch of each worker.
        short = [i for i, batch in enumerate(batches) if _short_of_k(batch)]
        assert len(short) <= max(num_workers, 1), short
        seen.update(int(i) for batch in batches for i in batch["index"])
    assert len(set(counts)) == 1
    assert set(seen) == set(range(N))
    assert sum(seen.values()) - N <= world_size - 1


def test_unbalanced_batches_would_often_miss_a_class(make_dataset: Callable[..., str]) -> None:
    # The control: without min_per_class, batches of 40 over 10 classes often lack two of some class.
    url = make_dataset(N, num_shards=6)
    batches = list(StreamingDataset(url, batch_size=BATCH, shuffle=True, seed=2))
    assert sum(_short_of_k(batch) for batch in batches) > len(batches) // 4


def test_balanced_resume_on_the_same_topology_is_exact(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=6)
    loader = StreamingDataLoader(_balanced(url), num_workers=2)
    before = list(islice(iter(loader), 11))
    fresh = StreamingDataLoader(_balanced(url), num_workers=2)
    fresh.load_state_dict(loader.state_dict())
    assert len(fresh) == len(loader)
    after = list(fresh)
    indices = [int(i) for batch in before + after for i in batch["index"]]
    assert sorted(indices) == list(range(N))
    uninterrupted = list(StreamingDataLoader(_balanced(url), num_workers=2))
    # The same batches as an uninterrupted epoch (workers may interleave in another order after a resume).
    assert {frozenset(b["index"].tolist()) for b in before + after} == {
        frozenset(b["index"].tolist()) for b in uninterrupted
    }


def test_balanced_resume_on_another_topology_fails_clearly(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=6)
    loader = StreamingDataLoader(_balanced(url), num_workers=0)
    list(islice(iter(loader), 3))
    fresh = StreamingDataLoader(_balanced(url), num_workers=2)
    fresh.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match=r"needs the topology that saved the state: world_size=1, num_workers=0"):
        list(fresh)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 15}, r"batch_size=15 cannot hold min_per_class=2 samples of each of 10 classes"),
        ({"batch_size": None}, r"min_per_class=2 balances whole batches: construct the dataset with `batch_size=N`"),
        (
            {"min_per_class": None, "class_balance": ClassBalance(K, label_field="kind")},
            r"needs the label field 'kind', but the dataset's fields are .*: pass `ClassBalance\(label_field=\.\.\.\)`",
        ),
    ],
)
def test_invalid_balancing_fails_at_construction(
    make_dataset: Callable[..., str], kwargs: dict[str, Any], message: str
) -> None:
    url = make_dataset(N, num_shards=6)
    arguments: dict[str, Any] = {"batch_size": BATCH, "min_per_class": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        StreamingDataset(url, **arguments)


def test_class_counts_read_only_the_label_column(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=6)
    dataset = StreamingDataset(url, batch_size=BATCH)
    before = dataset._reader.stats.bytes_read
    counts = dataset.class_counts()
    assert counts.tolist() == [N // 10] * 10
    # Labels are 8 bytes each; the images (16 bytes each) are never read.
    assert dataset._reader.stats.bytes_read - before < N * 8 + 6 * 4096


def test_a_class_with_too_few_samples_fails_at_construction(tmp_path: Any) -> None:
    from lightning_patterns.data.shards import write_dataset

    labels = np.arange(N) % 10
    labels[labels == 9] = 0  # class 9 becomes rare: only the samples below keep it
    labels[:30] = 9
    samples = [{"index": np.int64(i), "label": np.int64(label)} for i, label in enumerate(labels)]
    url = str(tmp_path / "skewed")
    write_dataset(samples, url, progress=False)
    with pytest.raises(ValueError, match=r"class 9 has 30 samples but 50 batches × min_per_class=2 need 100"):
        StreamingDataset(url, batch_size=BATCH, min_per_class=K)
