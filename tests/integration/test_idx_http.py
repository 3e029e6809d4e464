"""IDX files served over HTTP (with and without faults) decode exactly as numpy decodes the same bytes."""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from lightning_patterns.data.remote import RetryPolicy
from lightning_patterns.data.streaming.idx import IDXDataset
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

if TYPE_CHECKING:
    from tests.conftest import LightningPackage

pytestmark = pytest.mark.remote

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.02, timeout=0.2)


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_pair(root: Path, stem: str, n: int, *, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    labels = idx_bytes(rng.integers(0, 10, n, dtype=np.uint8))
    (root / f"{stem}-images-idx3-ubyte").write_bytes(images)
    (root / f"{stem}-labels-idx1-ubyte").write_bytes(labels)
    (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    write_pair(root, "train", 300)
    write_pair(root, "large", 5000, seed=1)
    write_pair(root, "other", 299, seed=2)
    (root / "bad-images").write_bytes(idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8), dtype_code=0x0D))
    return root


@pytest.fixture
def server(root: Path) -> Iterator[FaultInjectingHTTPServer]:
    with serve_directory(root, stall_seconds=0.3) as srv:
        yield srv


def numpy_decode(root: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer((root / f"{stem}-images-idx3-ubyte").read_bytes(), dtype=np.uint8, offset=16)
    labels = np.frombuffer((root / f"{stem}-labels-idx1-ubyte").read_bytes(), dtype=np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("failure_rate", [0.0, 0.1])
def test_streamed_idx_equals_numpy_decoding(root: Path, suffix: str, failure_rate: float) -> None:
    expected_images, expected_labels = numpy_decode(root, "train")
    with serve_directory(root, failure_rate=failure_rate, stall_seconds=0.3, seed=3) as server:
        dataset = IDXDataset(
            server.url_for(f"train-images-idx3-ubyte{suffix}"),
            server.url_for(f"train-labels-idx1-ubyte{suffix}"),
            chunk_samples=64,
            block_size=16 * 1024,
            retry=FAST,
        )
        with dataset:
            samples = list(dataset)
            batches = list(dataset.iter_batches(100))
            assert len(dataset) == 300
        if failure_rate:
            assert server.fault_count > 0
    images = torch.stack([s["image"] for s in samples]).numpy()
    labels = torch.stack([s["label"] for s in samples]).numpy()
    assert images.tobytes() == expected_images.tobytes()
    assert np.array_equal(labels, expected_labels.astype(np.int64))
    assert torch.cat([b["image"] for b in batches]).numpy().tobytes() == expected_images.tobytes()
    assert torch.cat([b["label"] for b in batches]).numpy().tolist() == expected_labels.tolist()


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_first_sample_arrives_long_before_the_whole_file_is_read(
    root: Path, server: FaultInjectingHTTPServer, suffix: str
) -> None:
    images_name = f"large-images-idx3-ubyte{suffix}"
    file_size = (root / images_name).stat().st_size
    with IDXDataset(
        server.url_for(images_name),
        server.url_for(f"large-labels-idx1-ubyte{suffix}"),
        chunk_samples=16,
        block_size=32 * 1024,
    ) as dataset:
        samples = iter(dataset)
        first = next(samples)
        served = sum(r.bytes_sent for r in server.requests_for(images_name))
        samples.close()  # type: ignore[attr-defined]
    expected_images, _ = numpy_decode(root, "large")
    assert np.array_equal(first["image"].numpy(), expected_images[0])
    assert file_size > 3_000_000
    assert 0 < served <= 64 * 1024 < file_size // 40
    assert all(r.range is not None for r in server.requests_for(images_name) if r.method == "GET")


def test_bad_magic_is_a_clear_error(server: FaultInjectingHTTPServer) -> None:
    url = server.url_for("bad-images")
    with (
        IDXDataset(url, server.url_for("train-labels-idx1-ubyte")) as dataset,
        pytest.raises(ValueError, match="not an IDX images file") as info,
    ):
        next(iter(dataset))
    assert url in str(info.value)
    assert "0x00000d03, expected 0x00000803" in str(info.value)


def test_count_mismatch_is_a_clear_error(server: FaultInjectingHTTPServer) -> None:
    with (
        IDXDataset(
            server.url_for("train-images-idx3-ubyte.gz"), server.url_for("other-labels-idx1-ubyte.gz")
        ) as dataset,
        pytest.raises(ValueError, match=r"holds 300 samples but the labels file .* holds 299"),
    ):
        next(iter(dataset))


def test_missing_file_is_not_retried(server: FaultInjectingHTTPServer) -> None:
    with (
        IDXDataset(server.url_for("nope-images.gz"), server.url_for("train-labels-idx1-ubyte"), retry=FAST) as dataset,
        pytest.raises(FileNotFoundError, match=re.escape("nope-images.gz")),
    ):
        next(iter(dataset))
    # fsspec's info() asks with HEAD, then once with GET; neither is retried.
    assert len(server.requests_for("nope-images.gz")) <= 2
    assert dataset.stats.retries == 0


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_dataloader_workers_stream_each_sample_once(root: Path, server: FaultInjectingHTTPServer, suffix: str) -> None:
    _, expected_labels = numpy_decode(root, "train")
    with IDXDataset(
        server.url_for(f"train-images-idx3-ubyte{suffix}"),
        server.url_for(f"train-labels-idx1-ubyte{suffix}"),
        chunk_samples=32,
        retry=FAST,
    ) as dataset:
        assert len(dataset) == 300  # the parent's connections exist now; the workers must open their own
        loader = torch.utils.data.DataLoader(dataset, batch_size=50, num_workers=2, multiprocessing_context="fork")
        labels = torch.cat([batch["label"] for batch in loader])
    assert sorted(labels.tolist()) == sorted(expected_labels.tolist())
    assert len(labels) == 300


def test_idx_datamodule_trains_from_http(
    root: Path, server: FaultInjectingHTTPServer, lightning_package: LightningPackage
) -> None:
    classes = lightning_package.classes
    datamodule = classes.IDXDataModule(
        server.url_for("large-images-idx3-ubyte.gz"),
        server.url_for("large-labels-idx1-ubyte.gz"),
        server.url_for("train-images-idx3-ubyte"),
        server.url_for("train-labels-idx1-ubyte"),
        batch_size=500,
        shuffle=True,
        cache="memory",
    )
    metrics = classes.DataMetricsCallback(print_summary=False)
    trainer = lightning_package.pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics],
    )
    trainer.fit(classes.MLPClassifier(hidden_dim=8), datamodule)
    assert trainer.global_step == 20
    assert "val_acc" in trainer.callback_metrics
    first, second = metrics.epochs
    assert first.samples == second.samples == 5000
    # The sanity check read the validation pair only; the training pair is fetched in epoch 1, then cached.
    assert first.remote_bytes == sum(
        (root / f"large-{kind}.gz").stat().st_size for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    assert second.remote_bytes == 0
    assert second.cache_hit_rate == 1.0


def test_idx_datamodule_needs_both_validation_urls() -> None:
    from lightning_patterns.data.idx_datamodule import IDXDataModule

    with pytest.raises(ValueError, match="Give both `val_images_url` and `val_labels_url`"):
        IDXDataModule("a", "b", val_images_url="c")


def _indexed_pair(root: Path, n: int) -> None:
    """IDX files whose image i carries i in its first two pixels (big-endian), gzip-compressed."""
    images = np.random.default_rng(5).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    (root / "indexed-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "indexed-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(n) % 10)))


@pytest.mark.slow
@pytest.mark.distributed
def test_idx_datamodule_under_ddp_shards_shuffles_and_caches(tmp_path: Path) -> None:
    n = 1000
    _indexed_pair(tmp_path, n)
    script = Path(__file__).parent / "scripts" / "idx_ddp.py"
    with serve_directory(tmp_path) as server:
        urls = [server.url_for(f"indexed-{kind}-idx{dims}-ubyte.gz") for kind, dims in (("images", 3), ("labels", 1))]
        result = subprocess.run(
            [sys.executable, str(script), *urls, str(tmp_path), str(tmp_path / "cache"), "2"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        served = {
            name: sum(r.bytes_sent for r in server.requests_for(name)) for name in ("indexed-images-idx3-ubyte.gz",)
        }
    records = [json.loads((tmp_path / f"idx-rank{rank}.json").read_text()) for rank in range(2)]
    for epoch in ("0", "1"):
        first, second = (set(record["seen"][epoch]) for record in records)
        assert not first & second  # disjoint halves...
        assert first | second == set(range(n))  # ...that together are every sample, once
        assert records[0]["batches"][epoch] == records[1]["batches"][epoch] == n // 2 // 50
    assert records[0]["seen"]["0"] != records[0]["seen"]["1"]  # reshuffled each epoch
    assert set(records[0]["seen"]["0"]) != set(records[0]["seen"]["1"])  # and each rank's share changes
    epochs = records[0]["epochs"]
    assert [e["samples"] for e in epochs] == [n, n]
    images_size = (tmp_path / "indexed-images-idx3-ubyte.gz").stat().st_size
    assert epochs[0]["remote_bytes"] >= images_size  # epoch 1 downloaded the pair (once for the machine)...
    assert epochs[1]["remote_bytes"] == 0  # ...epoch 2 read it from the disk cache
    assert served["indexed-images-idx3-ubyte.gz"] < 2 * images_size  # not once per rank
    assert records[0]["val_samples"] == records[1]["val_samples"] == n // 2 * 2  # validation sharded too (2 runs)
