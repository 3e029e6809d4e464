"""Issue 16, item 5 (the writer's part): overwrites keep old generations for running readers, garbage is
collected only when safe, and a dataset is never written beside unrelated files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from attack_helpers import samples

from lightning_patterns.commands.shards import run_shards_command
from lightning_patterns.data.shards import (
    MANIFEST_NAME,
    collect_garbage,
    load_manifest,
    write_dataset,
)
from lightning_patterns.data.shards.paths import shard_file_generation
from lightning_patterns.data.streaming import ReadAhead, StreamingDataset
from lightning_patterns.exceptions import DestinationNotEmptyError, ShardNotFoundError
from lightning_patterns.testing.http_server import serve_directory


def _indices(batches: list[dict[str, Any]]) -> list[int]:
    return sorted(int(i) for batch in batches for i in batch["index"])


def _shard_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if shard_file_generation(p.name) is not None}


def _renumbered(start: int, n: int) -> list[dict[str, Any]]:
    return [{**sample, "index": np.int64(start + i)} for i, sample in enumerate(samples(n))]


@pytest.mark.remote
def test_a_reader_started_on_the_old_manifest_finishes_its_epoch_across_an_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    old = write_dataset(samples(48), str(folder), shard_bytes=1024, progress=False)
    with serve_directory(tmp_path) as server:
        url = f"{server.url}/data"
        # read_ahead=0: each shard is fetched only when needed, so most are fetched after the overwrite.
        reader = StreamingDataset(url, batch_size=4, read_ahead=ReadAhead(shards=0))
        epoch = iter(reader)
        first = [next(epoch)]
        new = write_dataset(_renumbered(1000, 20), str(folder), mode="overwrite", shard_bytes=1024, progress=False)
        rest = list(epoch)
        assert _indices(first + rest) == list(range(48))  # the old generation, each sample once
        assert [g.generation for g in new.retired] == [old.generation]
        assert _indices(list(StreamingDataset(url, batch_size=4))) == list(range(1000, 1020))

        # Within the grace period nothing is garbage; past it (grace_period=0 here) the old generation is.
        assert collect_garbage(str(folder)).paths == ()
        report = collect_garbage(str(folder), grace_period=0)
        assert set(report.expired) == {s.path for s in old.shards}
        assert report.orphans == ()
        assert not report.removed
        assert _shard_files(folder) == {s.path for s in old.shards + new.shards}  # a dry run removes nothing
        assert collect_garbage(str(folder), grace_period=0, dry_run=False).removed
        assert _shard_files(folder) == {s.path for s in new.shards}
        assert load_manifest(str(folder)) == new  # the manifest is never rewritten by garbage collection

        # The old reader's next epoch cannot find its shards, and says why.
        with pytest.raises(
            ShardNotFoundError, match=r"was rewritten since this reader loaded its manifest \(it is now"
        ):
            list(reader)


def test_expired_generations_are_removed_by_the_next_write(tmp_path: Path) -> None:
    folder = str(tmp_path / "data")
    first = write_dataset(samples(8), folder, progress=False)
    second = write_dataset(samples(8), folder, mode="overwrite", progress=False)
    third = write_dataset(samples(8), folder, mode="overwrite", progress=False, grace_period=3600)
    assert [g.generation for g in third.retired] == [1, 2]  # both still inside their grace period
    fourth = write_dataset(samples(8), folder, mode="append", progress=False, grace_period=0)
    assert fourth.retired == ()
    assert _shard_files(tmp_path / "data") == {s.path for s in fourth.shards}
    assert {s.path for s in first.shards + second.shards}.isdisjoint(_shard_files(tmp_path / "data"))


_KILLED_WRITER = """
import sys, time
import numpy as np
from lightning_patterns.data.shards import write_dataset

def slow():
    for i in range(10**6):
        time.sleep(0.002)
        yield {"x": np.int64(i)}

write_dataset(slow(), sys.argv[1], shard_bytes=256, progress=False)
"""


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the shard files of a writer killed with ``kill -9`` mid-write (and no manifest)."""
    folder = tmp_path_factory.mktemp("killed") / "data"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not folder.is_dir() or len(_shard_files(folder)) < 5):
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL, err
    assert len(_shard_files(folder)) >= 5, err
    assert not (folder / MANIFEST_NAME).exists()
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of ``folder`` in ``tmp_path``, with the files' modification times."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@pytest.mark.slow
def test_orphans_of_a_killed_writer_are_collected_and_nothing_else(killed_writer: Path, tmp_path: Path) -> None:
    folder = _copy(killed_writer, tmp_path)
    orphans = _shard_files(folder)
    (folder / "notes.txt").write_text("not a shard")
    (folder / "shard-notes.lps").write_text("not named like the writer's shards")

    # Young orphans may belong to a writer still running: kept by default.
    young = collect_garbage(str(folder))
    assert young.orphans == ()
    assert set(young.kept) == orphans

    # A new dataset may be written there (the leftovers are a writer's), but not beside the notes without force.
    with pytest.raises(
        DestinationNotEmptyError, match=r"is not empty but holds no dataset manifest: it has 'notes\.txt'"
    ):
        write_dataset(samples(8), str(folder), progress=False)
    manifest = write_dataset(samples(8), str(folder), progress=False, force=True)

    dry = collect_garbage(str(folder), grace_period=0)
    assert set(dry.orphans) == orphans
    assert dry.num_bytes == sum((folder / name).stat().st_size for name in orphans)
    assert _shard_files(folder) == orphans | {s.path for s in manifest.shards}
    done = collect_garbage(str(folder), grace_period=0, dry_run=False)
    assert set(done.orphans) == orphans
    assert _shard_files(folder) == {s.path for s in manifest.shards}
    assert (folder / "notes.txt").read_text() == "not a shard"  # only files named as shards are ever removed
    assert (folder / "shard-notes.lps").exists()
    assert _indices(list(StreamingDataset(str(folder), batch_size=4))) == list(range(8))


def test_a_non_empty_folder_without_a_manifest_is_refused_unless_forced(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (folder / name).write_bytes(b"\xff\xd8")
    with pytest.raises(DestinationNotEmptyError) as info:
        write_dataset(samples(4), str(folder), progress=False)
    assert isinstance(info.value, FileExistsError)
    message = str(info.value)
    assert (
        f"{str(folder)!r} is not empty but holds no dataset manifest: it has 'a.jpg', 'b.jpg', 'c.jpg' and 1 more"
        in (message)
    )
    assert "Choose a new or empty folder, or pass force=True to write there anyway" in message
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # nothing written
    for mode in ("append", "overwrite"):
        with pytest.raises(DestinationNotEmptyError, match="holds no dataset manifest"):
            write_dataset(samples(4), str(folder), mode=mode, progress=False)
    write_dataset(samples(4), str(folder), progress=False, force=True)
    write_dataset(samples(4), str(folder), mode="append", progress=False)  # it holds a manifest now
    assert load_manifest(str(folder)).num_samples == 8


def test_collect_garbage_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`grace_period` must be a number of seconds >= 0, got grace_period=-1"):
        collect_garbage(str(tmp_path), grace_period=-1)
    with pytest.raises(ValueError, match=r"`grace_period` must be a number of seconds >= 0"):
        write_dataset(samples(1), str(tmp_path / "x"), grace_period=-1, progress=False)
    assert collect_garbage(str(tmp_path / "missing")).paths == ()


@pytest.mark.slow
def test_shards_gc_lists_a_killed_writers_orphans_and_removes_exactly_them(
    killed_writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(killed_writer, tmp_path)
    orphans = _shard_files(folder)
    (folder / "notes.txt").write_text("not a shard")
    # A dataset written there (with --force, because of the notes) after the writer was killed.
    argv = ["write", "synthetic:20", str(folder), "--force", "--no-progress"]
    assert run_shards_command(argv) == 0
    listed = {shard.path for shard in load_manifest(str(folder)).shards}
    capsys.readouterr()

    # By default the orphans are too young to be sure no writer still writes them: kept, and listed as kept.
    assert run_shards_command(["gc", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "orphans (no manifest lists them): 0 files" in out
    assert f"kept (inside the grace period): {len(orphans)} files" in out
    assert "dry run: nothing to remove" in out

    # A dry run lists them, with their bytes, and removes nothing.
    assert run_shards_command(["gc", str(folder), "--grace-period", "0"]) == 0
    out = capsys.readouterr().out
    assert f"orphans (no manifest lists them): {len(orphans)} files" in out
    assert {line.strip() for line in out.splitlines() if line.startswith("  ")} == orphans
    size = sum((folder / name).stat().st_size for name in orphans)
    assert f"bytes: {size} (" in out
    assert f"dry run: nothing removed; run again with --apply to remove these {len(orphans)} files" in out
    assert _shard_files(folder) == orphans | listed

    # --apply removes exactly them: the dataset's shards and other files stay.
    assert run_shards_command(["gc", str(folder), "--grace-period", "0s", "--apply"]) == 0
    out = capsys.readouterr().out
    assert f"removed: {len(orphans)} files" in out
    assert _shard_files(folder) == listed
    assert (folder / "notes.txt").read_text() == "not a shard"
    assert load_manifest(str(folder)).num_samples == 20
    assert run_shards_command(["gc", str(folder), "--grace-period", "0", "--apply"]) == 0
    assert "removed: 0 files" in capsys.readouterr().out


def test_shards_write_into_a_foreign_folder_suggests_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8")
    code = run_shards_command(["write", "synthetic:5", str(folder), "--no-progress"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert "is not empty but holds no dataset manifest: it has 'a.jpg'" in err
    assert "On the command line: pass --force to write there anyway." in err
    assert "--mode" not in err  # the FileExistsError hint (append/overwrite) would not help here
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]
    assert run_shards_command(["write", "synthetic:5", str(folder), "--no-progress", "--force"]) == 0
    assert load_manifest(str(folder)).num_samples == 5
