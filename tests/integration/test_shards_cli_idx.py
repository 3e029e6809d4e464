"""``lightning-patterns shards write --idx-images URL --idx-labels URL``: IDX files served over HTTP become shards."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.commands.shards import run_shards_command
from lightning_patterns.data.shards import load_manifest, read_shard
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

pytestmark = pytest.mark.remote

NUM_SAMPLES = 257


def idx_file(array: np.ndarray, magic: int) -> bytes:
    # Big-endian int32 magic (0x00000803 images, 0x00000801 labels), one int32 per dimension, then the bytes.
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("idx-cli")
    rng = np.random.default_rng(5)
    images = idx_file(rng.integers(0, 256, (NUM_SAMPLES, 28, 28), dtype=np.uint8), 0x00000803)
    labels = idx_file(rng.integers(0, 10, NUM_SAMPLES, dtype=np.uint8), 0x00000801)
    for name, data in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        (root / name).write_bytes(data)
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
    return root


@pytest.fixture
def server(root: Path) -> Iterator[FaultInjectingHTTPServer]:
    with serve_directory(root) as srv:
        yield srv


def numpy_decode(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer((root / "images-idx3-ubyte").read_bytes(), dtype=np.uint8, offset=16)
    labels = np.frombuffer((root / "labels-idx1-ubyte").read_bytes(), dtype=np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def read_back(url: str) -> tuple[np.ndarray, np.ndarray]:
    manifest = load_manifest(url)
    batches = [read_shard(url, s, schema=manifest.schema).read_range(0, s.num_samples) for s in manifest.shards]
    return (
        np.concatenate([b["image"].numpy() for b in batches]),
        np.concatenate([b["label"].numpy() for b in batches]),
    )


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_over_http_is_written_byte_for_byte(
    root: Path, server: FaultInjectingHTTPServer, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = str(tmp_path / "ds")
    images_url = server.url_for(f"images-idx3-ubyte{suffix}")
    argv = ["write", "--idx-images", images_url, "--idx-labels", server.url_for(f"labels-idx1-ubyte{suffix}")]
    code = run_shards_command([*argv, dest, "--shard-bytes", "32KiB", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote IDX {images_url} to {dest}" in out
    assert f"samples:  {NUM_SAMPLES}\n" in out
    manifest = load_manifest(dest)
    assert len(manifest.shards) > 1
    assert manifest.schema["image"].describe() == "uint8[28, 28]"
    expected_images, expected_labels = numpy_decode(root)
    images, labels = read_back(dest)
    assert images.dtype == np.uint8
    assert images.tobytes() == expected_images.tobytes()
    np.testing.assert_array_equal(labels, expected_labels)


def test_idx_over_http_hash_sharded_by_label(
    root: Path, server: FaultInjectingHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = str(tmp_path / "ds")
    argv = [
        "write",
        "--idx-images",
        server.url_for("images-idx3-ubyte.gz"),
        "--idx-labels",
        server.url_for("labels-idx1-ubyte.gz"),
        dest,
        "--num-shards",
        "4",
        "--hash-key",
        "label",
        "--no-progress",
    ]
    assert run_shards_command(argv) == 0
    capsys.readouterr()
    expected_images, expected_labels = numpy_decode(root)
    images, labels = read_back(dest)
    expected = sorted(zip(expected_labels.tolist(), (i.tobytes() for i in expected_images), strict=True))
    assert sorted(zip(labels.tolist(), (i.tobytes() for i in images), strict=True)) == expected


def test_missing_idx_file_names_its_url(
    server: FaultInjectingHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = server.url_for("no-such-images-idx3-ubyte.gz")
    argv = ["write", "--idx-images", missing, "--idx-labels", server.url_for("labels-idx1-ubyte"), str(tmp_path / "d")]
    assert run_shards_command([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "lightning-patterns shards write: error:" in err
    assert "no-such-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "d" / "manifest.json").exists()
