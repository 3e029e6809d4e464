from __future__ import annotations

import gzip
import io
import pickle
import struct
import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_patterns.data.streaming.idx import IDXDataset, IDXHeader, read_idx_header


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
