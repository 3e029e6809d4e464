"""``lightning-patterns cache info|clear`` through run_cache_command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.commands.cache import run_cache_command
from lightning_patterns.data.caching import DiskEpochCache, cache_info
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.shards import Manifest, load_manifest, write_dataset


class _Source:
    def __init__(self, root: Path) -> None:
        images = np.random.default_rng(0).integers(0, 255, size=(600, 8, 8), dtype=np.uint8)
        write_dataset([{"image": image, "label": i} for i, image in enumerate(images)], str(root), shard_bytes=8192)
        self.root = root
        self.manifest: Manifest = load_manifest(str(root))


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipe caches are found under ./lightning_logs, the demo shards under the user cache: both in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_PATTERNS_CACHE", str(tmp_path / "home"))


@pytest.fixture
def source(tmp_path: Path) -> _Source:
    return _Source(tmp_path / "dataset")


def _fill(cache_dir: Path, source: _Source, shards: int) -> None:
    cache = DiskEpochCache(cache_dir, min_free_bytes=0)
    cache.bind(source.manifest)
    for shard in range(shards):
        path = source.root / source.manifest.shards[shard].path
        cache.get_or_fetch(shard, path.read_bytes)


def test_info_counts_entries_bytes_and_datasets(
    source: _Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(tmp_path / "c", source, 4)
    expected_bytes = sum(s.num_bytes for s in source.manifest.shards[:4])
    assert run_cache_command(["info", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "entries: 4\n" in out
    assert f"bytes: {expected_bytes} " in out
    assert "datasets: 1\n" in out
    assert f"4/{len(source.manifest.shards)} shards cached" in out


def test_info_uses_the_environment_default(
    source: _Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIGHTNING_PATTERNS_CACHE", str(tmp_path / "env"))
    _fill(tmp_path / "env", source, 2)
    assert run_cache_command(["info"]) == 0
    assert "entries: 2\n" in capsys.readouterr().out


def test_clear_removes_only_the_cache_files(
    source: _Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(tmp_path / "c", source, 3)
    keep = [tmp_path / "c" / "user.txt", store_root(tmp_path / "c") / "entries" / "notes.lps.txt"]
    for path in keep:
        path.write_text("mine")
    assert run_cache_command(["clear", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "removed 7 files" in capsys.readouterr().out  # 3 entries, 3 locks, 1 dataset record
    info = cache_info(tmp_path / "c")
    assert (info.entries, info.num_bytes, info.datasets) == (0, 0, ())
    assert all(path.read_text() == "mine" for path in keep)
    # The cache works again after a clear.
    _fill(tmp_path / "c", source, 1)
    assert cache_info(tmp_path / "c").entries == 1


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cache_command(["shrink"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert run_cache_command([]) == 2


def _demo_dataset(root: Path) -> int:
    """A folder shaped like the embedded dataset's (train/ and val/ datasets); returns its bytes."""
    for split in ("train", "val"):
        images = np.zeros((20, 4, 4), dtype=np.uint8)
        write_dataset([{"image": image} for image in images], str(root / split), progress=False)
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def test_info_and_clear_cover_every_cache(source: _Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(tmp_path / "home", source, 1)  # the default disk cache ($LIGHTNING_PATTERNS_CACHE)
    _fill(tmp_path / "lightning_logs" / "fashion_mnist_ddp" / "cache", source, 2)  # a recipe's cache_dir
    (tmp_path / "lightning_logs" / "fashion_mnist" / "checkpoints").mkdir(parents=True)  # not a cache
    demo = tmp_path / "home" / "demo" / "fashion_like-40-40-seed0-1024"
    demo_bytes = _demo_dataset(demo)
    (tmp_path / "home" / "demo" / "notes.txt").write_text("mine")

    assert run_cache_command(["info"]) == 0
    out = capsys.readouterr().out
    assert f"disk cache\n  cache: {store_root(tmp_path / 'home')}\n  entries: 1\n" in out
    recipe_root = store_root(Path("lightning_logs") / "fashion_mnist_ddp" / "cache")
    assert f"recipe cache (fashion_mnist_ddp)\n  cache: {recipe_root}\n  entries: 2\n" in out
    assert "recipe cache (fashion_mnist)" not in out
    assert f"demo shards\n  folder: {tmp_path / 'home' / 'demo'}\n  bytes: {demo_bytes} " in out
    assert f"  datasets: 1\n    {demo.name}  " in out
    entries = sum(s.num_bytes for s in source.manifest.shards[:3])
    assert f"total: {entries + demo_bytes} bytes" in out

    assert run_cache_command(["clear", "--demo"]) == 0
    assert "demo shards: removed 1 datasets" in capsys.readouterr().out
    assert not demo.exists()
    assert (tmp_path / "home" / "demo" / "notes.txt").read_text() == "mine"
    assert cache_info(tmp_path / "home").entries == 1  # --demo leaves the disk caches alone

    assert run_cache_command(["clear", "--recipes"]) == 0
    assert "recipe cache (fashion_mnist_ddp): removed 5 files" in capsys.readouterr().out
    assert cache_info(tmp_path / "lightning_logs" / "fashion_mnist_ddp" / "cache").entries == 0
    assert cache_info(tmp_path / "home").entries == 1

    assert run_cache_command(["clear"]) == 0  # everything left
    assert "disk cache: removed 3 files" in capsys.readouterr().out
    assert cache_info(tmp_path / "home").entries == 0
