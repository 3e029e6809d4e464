from __future__ import annotations

import numpy as np
import pytest

from lightning_patterns.data.in_memory import InMemoryDataModule
from lightning_patterns.data.synthetic import fashion_like_arrays, iter_fashion_like


def test_same_seed_same_data_and_any_range_matches_the_whole() -> None:
    images, labels = fashion_like_arrays(9000, seed=3)
    again, again_labels = fashion_like_arrays(9000, seed=3)
    assert np.array_equal(images, again)
    assert np.array_equal(labels, again_labels)
    part, part_labels = fashion_like_arrays(5000, seed=3, start=4000)
    assert np.array_equal(part, images[4000:])
    assert np.array_equal(part_labels, labels[4000:])


def test_splits_and_seeds_differ() -> None:
    train, _ = fashion_like_arrays(100, split="train")
    val, _ = fashion_like_arrays(100, split="val")
    other, _ = fashion_like_arrays(100, seed=1)
    assert not np.array_equal(train, val)
    assert not np.array_equal(train, other)


def test_classes_are_balanced_and_separable_by_their_means() -> None:
    images, labels = fashion_like_arrays(20000)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 1700
    # A nearest-class-mean classifier must beat chance by far: the data has learnable class structure.
    flat = images.reshape(len(images), -1).astype(np.float32)
    means = np.stack([flat[labels == c].mean(axis=0) for c in range(10)])
    test_images, test_labels = fashion_like_arrays(2000, split="val")
    test_flat = test_images.reshape(len(test_images), -1).astype(np.float32)
    distances = ((test_flat[:, None, :] - means[None]) ** 2).sum(axis=2)
    accuracy = (distances.argmin(axis=1) == test_labels).mean()
    assert 0.5 < accuracy < 1.0


def test_iter_matches_arrays() -> None:
    images, labels = fashion_like_arrays(5000)
    samples = list(iter_fashion_like(5000))
    assert len(samples) == 5000
    assert np.array_equal(samples[4321]["image"], images[4321])
    assert samples[4321]["label"] == labels[4321]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": -1}, "num_samples=-1"),
        ({"num_samples": 1, "start": -2}, "start=-2"),
        ({"num_samples": 1, "split": "dev"}, "Unknown split 'dev'"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fashion_like_arrays(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_samples": 0}, "train_samples=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_in_memory_datamodule_invalid_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InMemoryDataModule(**kwargs)


def test_in_memory_datamodule_batches() -> None:
    datamodule = InMemoryDataModule(train_samples=100, val_samples=30, batch_size=32)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 28, 28)
    assert labels.shape == (32,)
    assert sum(len(batch[1]) for batch in datamodule.val_dataloader()) == 30
