from __future__ import annotations

import gzip
import io
import pickle
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_patterns.data.streaming.idx import IDXDataset, IDXHeader, read_idx_header
from lightning_patterns.data.streaming.idx_loader import IDXDataLoader


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def root() -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    path = f"/idx-{uuid.uuid4().hex}"
    yield f"memory://{path}"
    if fs.exists(path):
        fs.rm(path, recursive=True)


def put(url: str, data: bytes) -> str:
    fsspec.filesystem("memory").pipe(url.removeprefix("memory://"), data)
    return url


def make(
    root: str, n: int = 50, *, gz: bool = False, seed: int = 0, unique_labels: bool = False
) -> tuple[str, str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) if unique_labels else rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    return (
        put(f"{root}/images{suffix}", pack(idx_bytes(images))),
        put(f"{root}/labels{suffix}", pack(idx_bytes(labels))),
        images,
        labels,
    )


def test_read_idx_header() -> None:
    f = io.BytesIO(struct.pack(">I3I", 0x803, 2, 28, 28) + b"rest")
    header = read_idx_header(f)
    assert header == IDXHeader(0x08, (2, 28, 28))
    assert (header.magic, header.header_size, header.count, header.sample_shape) == (0x803, 16, 2, (28, 28))
    assert header.sample_bytes == 784
    assert f.read() == b"rest"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "ends after 2 bytes"),
        (struct.pack(">I", 0x0803) + b"\x00\x00", "ends after 2 bytes, before its IDX dimensions"),
        (struct.pack(">I", 0x12345678), "magic number 0x12345678"),
        (struct.pack(">I", 0x00000800), "magic number 0x00000800"),
        (b"\x1f\x8b\x08\x00", "looks gzip-compressed"),
    ],
)
def test_read_idx_header_rejects_bad_headers(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_idx_header(io.BytesIO(data), name="file.idx")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("chunk_samples", [1, 7, 50, 1024])
def test_iterates_samples_exactly(root: str, gz: bool, chunk_samples: int) -> None:
    images_url, labels_url, images, labels = make(root, gz=gz)
    with IDXDataset(images_url, labels_url, chunk_samples=chunk_samples, block_size=1000) as dataset:
        samples = list(dataset)
        assert len(dataset) == 50
    assert len(samples) == 50
    for sample, image, label in zip(samples, images, labels, strict=True):
        assert sample["image"].dtype == torch.uint8
        assert sample["image"].shape == (28, 28)
        assert sample["label"].dtype == torch.int64
        assert sample["label"].shape == ()
        assert np.array_equal(sample["image"].numpy(), image)
        assert int(sample["label"]) == int(label)


@pytest.mark.parametrize("drop_last", [False, True])
def test_iter_batches(root: str, drop_last: bool) -> None:
    images_url, labels_url, images, labels = make(root, n=23)
    with IDXDataset(images_url, labels_url) as dataset:
        batches = list(dataset.iter_batches(5, drop_last=drop_last))
    assert [len(b["label"]) for b in batches] == ([5] * 4 if drop_last else [5, 5, 5, 5, 3])
    got_images = torch.cat([b["image"] for b in batches]).numpy()
    got_labels = torch.cat([b["label"] for b in batches]).numpy()
    n = len(got_labels)
    assert np.array_equal(got_images, images[:n])
    assert np.array_equal(got_labels, labels[:n].astype(np.int64))
    assert batches[0]["image"].shape == (5, 28, 28)


def test_default_collate_and_len(root: str) -> None:
    images_url, labels_url, images, labels = make(root, n=10)
    with IDXDataset(images_url, labels_url) as dataset:
        assert len(dataset) == 10
        batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert np.array_equal(batch["image"].numpy(), images[:4])
    assert np.array_equal(batch["label"].numpy(), labels[:4])


def test_workers_split_chunks_without_duplicates(root: str) -> None:
    images_url, labels_url, _, labels = make(root, n=40, unique_labels=True)
    dataset = IDXDataset(images_url, labels_url, chunk_samples=3)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    # Labels tag each sample uniquely here, so a duplicate or a loss would show.
    got = sorted(int(s["label"]) for s in loader)
    assert got == sorted(labels.tolist())
    dataset.close()


def test_dataset_pickles(root: str) -> None:
    images_url, labels_url, images, _ = make(root, n=5)
    with IDXDataset(images_url, labels_url, chunk_samples=2) as dataset:
        assert len(dataset) == 5
        with pickle.loads(pickle.dumps(dataset)) as clone:
            assert np.array_equal(torch.stack([s["image"] for s in clone]).numpy(), images)
            assert clone.stats.bytes_read > 0


def test_swapped_files_are_a_clear_error(root: str) -> None:
    images_url, labels_url, _, _ = make(root, n=5)
    with (
        IDXDataset(labels_url, images_url) as dataset,
        pytest.raises(ValueError, match="not an IDX images file") as info,
    ):
        next(iter(dataset))
    assert "magic number 0x00000801, expected 0x00000803" in str(info.value)
    assert labels_url in str(info.value)


def test_count_mismatch_is_a_clear_error(root: str) -> None:
    images_url, _, _, _ = make(root, n=5)
    labels_url = put(f"{root}/other-labels", idx_bytes(np.zeros(6, dtype=np.uint8)))
    with IDXDataset(images_url, labels_url) as dataset, pytest.raises(ValueError, match="holds 5 samples") as info:
        list(dataset)
    assert "holds 6" in str(info.value)


def test_truncated_file_is_a_clear_error(root: str) -> None:
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    images_url = put(f"{root}/short-images", idx_bytes(images)[:-100])
    labels_url = put(f"{root}/labels", idx_bytes(np.zeros(5, dtype=np.uint8)))
    with IDXDataset(images_url, labels_url) as dataset, pytest.raises(ValueError, match="end early"):
        list(dataset)


def test_missing_file_is_file_not_found(root: str) -> None:
    _, labels_url, _, _ = make(root, n=5)
    with IDXDataset(f"{root}/nope", labels_url) as dataset, pytest.raises(FileNotFoundError, match="nope"):
        list(dataset)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images_url": ""}, "images_url=''"),
        ({"labels_url": None}, "labels_url=None"),
        ({"chunk_samples": 0}, "chunk_samples=0"),
        ({"block_size": -1}, "block_size=-1"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"images_url": "memory://i", "labels_url": "memory://l", **kwargs}
    with pytest.raises(ValueError, match=match):
        IDXDataset(**args)  # type: ignore[arg-type]


def test_invalid_batch_size(root: str) -> None:
    with IDXDataset("memory://i", "memory://l") as dataset, pytest.raises(ValueError, match="batch_size=0"):
        next(dataset.iter_batches(0))


def _labels_of(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(label) for batch in batches for label in batch["label"]]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("world_size", "num_workers", "shuffle"), [(2, 0, False), (2, 2, True), (3, 2, True)])
def test_ranks_and_workers_read_disjoint_shares_of_equal_length(
    root: str, gz: bool, world_size: int, num_workers: int, shuffle: bool
) -> None:
    n = 101  # labels tag the samples (unique), and images must stay with their labels
    images_url, labels_url, images, _ = make(root, n=n, gz=gz, unique_labels=True)
    seen: list[int] = []
    batch_counts = []
    for rank in range(world_size):
        dataset = IDXDataset(
            images_url, labels_url, chunk_samples=8, batch_size=10, shuffle=shuffle, rank=rank, world_size=world_size
        )
        loader = IDXDataLoader(
            dataset, num_workers=num_workers, multiprocessing_context="fork" if num_workers else None
        )
        batches = list(loader)
        batch_counts.append(len(batches))
        assert len(batches) == len(loader) == len(dataset)
        for batch in batches:
            for image, label in zip(batch["image"], batch["label"], strict=True):
                assert np.array_equal(image.numpy(), images[int(label)])
        seen += _labels_of(batches)
        assert loader.metrics()["samples"] == dataset.samples_per_rank() == -(-n // world_size)
    assert len(set(batch_counts)) == 1
    assert set(seen) == set(range(n))
    assert len(seen) - n <= world_size - 1  # padding repeats only


def test_shuffle_is_seeded_per_epoch_and_the_same_on_every_rank(root: str) -> None:
    images_url, labels_url, _, _ = make(root, n=120, unique_labels=True)

    def epoch_order(epoch: int, seed: int = 3, rank: int = 0) -> list[int]:
        dataset = IDXDataset(
            images_url, labels_url, chunk_samples=10, batch_size=8, shuffle=True, seed=seed, rank=rank, world_size=2
        )
        dataset.set_epoch(epoch)
        return _labels_of(list(dataset))

    assert epoch_order(0) == epoch_order(0)
    assert epoch_order(0) != epoch_order(1)
    assert epoch_order(0) != epoch_order(0, seed=4)
    assert set(epoch_order(1)) != set(epoch_order(0))  # each rank's share changes with the epoch
    assert not set(epoch_order(5)) & set(epoch_order(5, rank=1))
    # Iterating again without set_epoch reads the next epoch; without shuffle, file order.
    dataset = IDXDataset(
        images_url, labels_url, chunk_samples=10, batch_size=8, shuffle=True, seed=3, rank=0, world_size=2
    )
    assert [_labels_of(list(dataset)) for _ in range(2)] == [epoch_order(0), epoch_order(1)]
    plain = IDXDataset(images_url, labels_url, batch_size=8, rank=0, world_size=1)
    assert _labels_of(list(plain)) == list(range(120))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("cache", "num_workers"), [("memory", 0), ("memory", 2), ("disk", 2)])
def test_a_cache_makes_epoch_two_read_nothing_remote(
    root: str, tmp_path: Any, gz: bool, cache: str, num_workers: int
) -> None:
    images_url, labels_url, images, _ = make(root, n=90, gz=gz, unique_labels=True)
    cache_dir = str(tmp_path / "cache") if cache == "disk" else None
    dataset = IDXDataset(
        images_url,
        labels_url,
        chunk_samples=8,
        batch_size=10,
        shuffle=True,
        rank=1,
        world_size=2,
        cache=cache,
        cache_dir=cache_dir,
    )
    loader = IDXDataLoader(dataset, num_workers=num_workers, multiprocessing_context="fork" if num_workers else None)
    remote, hits, epochs = [], [], []
    for _ in range(2):
        before = loader.metrics()
        epochs.append(_labels_of(list(loader)))
        after = loader.metrics()
        remote.append(after["remote_bytes"] - before["remote_bytes"])
        hits.append(after["cache_hits"] - before["cache_hits"])
    fs = fsspec.filesystem("memory")
    files = sum(fs.size(url.removeprefix("memory://")) for url in (images_url, labels_url))
    assert remote[0] == files  # epoch 1 fetched the pair once (the workers share it)...
    assert remote[1] == 0  # ...epoch 2 read it from the cache
    assert hits[1] > 0
    assert epochs[0] != epochs[1]
    assert sorted(epochs[0]) == sorted(set(epochs[0]))
    if cache == "disk":
        # A new run finds the pair on disk (its checksums recorded), verified, and reads nothing but the headers.
        again = IDXDataset(
            images_url, labels_url, batch_size=10, rank=0, world_size=1, cache=cache, cache_dir=cache_dir
        )
        rerun = IDXDataLoader(again)
        batches = list(rerun)
        assert rerun.metrics()["remote_bytes"] == 0
        assert np.array_equal(torch.cat([b["image"] for b in batches]).numpy(), images)


def test_idx_loader_and_cache_errors(root: str) -> None:
    images_url, labels_url, _, _ = make(root, n=5)
    with pytest.raises(ValueError, match=r"IDXDataLoader needs the dataset to yield whole batches"):
        IDXDataLoader(IDXDataset(images_url, labels_url))
    with pytest.raises(ValueError, match=r"IDXDataLoader decides shuffle itself"):
        IDXDataLoader(IDXDataset(images_url, labels_url, batch_size=2), shuffle=True)
    with pytest.raises(ValueError, match=r"cache='disk' needs a folder to keep shards in"):
        IDXDataset(images_url, labels_url, cache="disk")
    with pytest.raises(ValueError, match=r"IDXDataset\(batch_size=0\) must be a positive integer or None"):
        IDXDataset(images_url, labels_url, batch_size=0)
    with pytest.raises(ValueError, match=r"set_epoch\(epoch=-1\) needs an integer >= 0"):
        IDXDataset(images_url, labels_url).set_epoch(-1)
    with pytest.raises(ValueError, match=r"Give both rank and world_size or neither"):
        IDXDataset(images_url, labels_url, rank=1)
