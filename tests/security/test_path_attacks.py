"""Issue 16, item 3: shard paths never leave the dataset root, in any encoding, over HTTP or through symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from attack_helpers import HostileServer, body, edit_manifest, make_dataset, read_manifest_json, shard_bytes

from lightning_patterns.data.shards import load_manifest, read_shard, validate_shard_path, verify_dataset
from lightning_patterns.data.streaming import ReadAhead, StreamingDataset
from lightning_patterns.exceptions import UnsafePathError

# (path as a manifest records it, what the refusal says about it: the form that is unsafe, and why)
UNSAFE_PATHS = [
    ("%2e%2e/secret.lps", "reads as '../secret.lps' and has an empty, '.' or '..' component"),
    ("%2E%2E/secret.lps", "reads as '../secret.lps'"),
    ("%252e%252e/secret.lps", "reads as '../secret.lps'"),  # decoded twice by two layers
    ("..%2fsecret.lps", "reads as '../secret.lps'"),
    ("a/%2e%2e/%2e%2e/secret.lps", "reads as 'a/../../secret.lps'"),
    ("%2fetc%2fpasswd", "reads as '/etc/passwd' and is absolute"),
    ("\uff0e\uff0e/secret.lps", "reads as '../secret.lps'"),  # fullwidth full stops, NFKC-normalised
    ("\uff0e\uff0e\uff0fsecret.lps", "reads as '../secret.lps'"),  # ... and a fullwidth solidus
    ("a/\u2025/secret.lps", "reads as 'a/../secret.lps'"),  # TWO DOT LEADER
    ("http%3a%2f%2fevil.example%2fx.lps", "reads as 'http://evil.example/x.lps' and contains ':'"),
    ("s3:x.lps", "contains ':'"),
    ("%5c..%5csecret.lps", "reads as '\\\\..\\\\secret.lps' and contains a backslash"),
    ("shard\x00.lps", "contains a control or invisible formatting character"),
    ("shard%00.lps", "control or invisible formatting character"),
    ("shard\n.lps", "control or invisible formatting character"),
    ("shard\u202e.lps", "control or invisible formatting character"),  # RIGHT-TO-LEFT OVERRIDE
    ("shard.lps?x=1", "contains '?' or '#'"),
    ("shard.lps#frag", "contains '?' or '#'"),
    ("%25252525252e.lps", "still percent-encoded after 4 rounds of decoding"),
    ("/etc/passwd", "is absolute"),
    ("../secret.lps", "has an empty, '.' or '..' component"),
]


@pytest.mark.parametrize(("path", "reason"), UNSAFE_PATHS, ids=[repr(p) for p, _ in UNSAFE_PATHS])
def test_an_unsafe_shard_path_is_refused_when_the_manifest_is_loaded(tmp_path: Path, path: str, reason: str) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    edit_manifest(folder, lambda m: m["shards"][0].update(path=path))
    with pytest.raises(UnsafePathError) as info:
        load_manifest(str(folder))
    assert f"lists shard path {path!r}, which " in str(info.value)
    assert reason in str(info.value)
    assert "could point outside the dataset root" in str(info.value)
    with pytest.raises(UnsafePathError):
        validate_shard_path(path)


@pytest.mark.parametrize("path", ["shard-00001.lps", "sub/dir/shard.lps", "100%.lps", "caf%C3%A9.lps", "café.lps"])
def test_safe_paths_are_accepted_unchanged(path: str) -> None:
    assert validate_shard_path(path) == path


def test_a_retired_generation_with_an_unsafe_path_is_refused(tmp_path: Path) -> None:
    # Retired shards are deleted once their grace period is over: an escaping path there would delete outside.
    folder = tmp_path / "data"
    make_dataset(folder)
    edit_manifest(folder, lambda m: m.update(retired=[{"generation": 0, "retired_at": 0, "shards": ["%2e%2e/x.lps"]}]))
    with pytest.raises(UnsafePathError, match=r"lists shard path '%2e%2e/x.lps', which reads as '../x.lps'"):
        load_manifest(str(folder))


@pytest.mark.remote
def test_over_http_an_encoded_escape_never_reaches_the_server(hostile: HostileServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    secret = shard_bytes(folder, 0)
    # Outside the dataset root but on the same host: a naive server serves /data/%2e%2e/secret.lps from here.
    hostile.routes["/secret.lps"] = body(secret)
    edit_manifest(folder, lambda m: m["shards"][0].update(path="%2e%2e/secret.lps"))
    url = hostile.serve_folder("data", folder)
    with pytest.raises(UnsafePathError, match=r"'%2e%2e/secret.lps', which reads as '../secret.lps'"):
        StreamingDataset(url, batch_size=4)
    assert not [r for r in hostile.requests if r.path == "/secret.lps"]
    assert [r.path for r in hostile.requests] == ["/data/manifest.json"]


def _symlink_a_shard_outside(folder: Path, outside: Path) -> str:
    # The target holds the shard's own bytes, so the checksum matches: only the path check can refuse it.
    path = read_manifest_json(folder)["shards"][0]["path"]
    outside.write_bytes((folder / path).read_bytes())
    (folder / path).unlink()
    (folder / path).symlink_to(outside)
    return path


def test_a_local_shard_symlinked_outside_the_root_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    path = _symlink_a_shard_outside(folder, tmp_path / "outside.lps")
    message = rf"'{folder / path}' resolves to '{tmp_path / 'outside.lps'}', outside the dataset root '{folder}'"
    with pytest.raises(UnsafePathError, match=message):
        list(StreamingDataset(str(folder), batch_size=4))
    with pytest.raises(UnsafePathError, match=message):
        verify_dataset(str(folder))
    with pytest.raises(UnsafePathError, match=message):
        read_shard(str(folder), load_manifest(str(folder)).shards[0])


def test_a_symlinked_folder_that_leads_outside_is_refused_too(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    manifest = read_manifest_json(folder)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "shard.lps").write_bytes(shard_bytes(folder, 0))
    (folder / "sub").symlink_to(outside)
    edit_manifest(folder, lambda m: m["shards"][0].update(path="sub/shard.lps"))
    assert manifest["shards"][0]["num_bytes"] == (outside / "shard.lps").stat().st_size
    with pytest.raises(UnsafePathError, match=r"resolves to .*elsewhere/shard\.lps', outside the dataset root"):
        list(StreamingDataset(str(folder), batch_size=4))


def test_symlinks_inside_the_root_and_a_symlinked_root_are_read(tmp_path: Path) -> None:
    real = tmp_path / "real"
    make_dataset(real)
    # A shard linked to another place inside the root is fine, and so is a root reached through a symlink.
    path = read_manifest_json(real)["shards"][0]["path"]
    (real / "kept").mkdir()
    os.replace(real / path, real / "kept" / path)
    (real / path).symlink_to(real / "kept" / path)
    (tmp_path / "link").symlink_to(real)
    for root in (real, tmp_path / "link"):
        batches = list(StreamingDataset(str(root), batch_size=48))
        assert sorted(batches[0]["index"].tolist()) == list(range(48))


def test_a_shard_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    # Reading a FIFO (or a device) would block or never end: only regular files are read.
    folder = tmp_path / "data"
    make_dataset(folder)
    path = read_manifest_json(folder)["shards"][0]["path"]
    (folder / path).unlink()
    os.mkfifo(folder / path)
    with pytest.raises(OSError, match="Not a regular file"):
        list(StreamingDataset(str(folder), batch_size=4, read_ahead=ReadAhead(timeout=10)))
