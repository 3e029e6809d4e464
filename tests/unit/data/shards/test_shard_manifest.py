"""Unit tests of the manifest: loading, validation, safe shard paths, missing and corrupt shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pytest

from lightning_patterns.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    load_manifest,
    manifest_exists,
    publish_manifest,
    read_shard,
    shard_url,
    validate_shard_path,
    verify_checksum,
    verify_dataset,
    write_dataset,
)
from lightning_patterns.exceptions import ChecksumMismatchError, ManifestError, ShardNotFoundError, UnsafePathError
from lightning_patterns.testing.http_server import serve_directory


def _edit_manifest(url: str, edit: Any) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    data = json.loads(fs.cat_file(f"{root}/{MANIFEST_NAME}"))
    edit(data)
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", json.dumps(data).encode())


def test_manifest_json_round_trip(memory_url: str) -> None:
    manifest = write_dataset([{"x": 1, "s": "a"}] * 3, memory_url, progress=False)
    text = manifest.to_json()
    data = json.loads(text)
    assert data["version"] == FORMAT_VERSION == 1
    assert data["num_samples"] == 3
    assert data["schema"] == {"x": {"dtype": "int64", "shape": []}, "s": {"dtype": "str", "shape": None}}
    assert data["sharding"] == {"rule": "size", "shard_bytes": 32 * 2**20}
    assert set(data["shards"][0]) == {"path", "num_samples", "num_bytes", "checksum", "bucket"}
    assert Manifest.from_json(text, memory_url) == manifest
    assert load_manifest(f"{memory_url}/{MANIFEST_NAME}") == manifest  # the manifest URL itself works too
    assert manifest_exists(memory_url)


def test_label_counts_round_trip_and_default_to_none_recorded(memory_url: str) -> None:
    manifest = write_dataset([{"x": 1}] * 3, memory_url, progress=False)
    assert manifest.shards[0].label_counts == {}
    _edit_manifest(memory_url, lambda d: d["shards"][0].update(label_counts={"x": [0, 3], "y": [1, 1, 1]}))
    loaded = load_manifest(memory_url)
    assert loaded.shards[0].label_counts == {"x": (0, 3), "y": (1, 1, 1)}
    assert json.loads(loaded.to_json())["shards"][0]["label_counts"] == {"x": [0, 3], "y": [1, 1, 1]}
    assert Manifest.from_json(loaded.to_json(), memory_url) == loaded


def test_missing_manifest(memory_url: str) -> None:
    with pytest.raises(ManifestError, match=r"No dataset manifest at 'memory://.*/manifest.json'\. Write the dataset"):
        load_manifest(memory_url)
    assert not manifest_exists(memory_url)


def test_missing_manifest_local_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=f"{tmp_path}/nothing/manifest.json"):
        load_manifest(str(tmp_path / "nothing"))


def test_unreadable_manifest(memory_url: str) -> None:
    write_dataset([{"x": 1}], memory_url, progress=False)
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", b'{"version": 1, "schema": ')
    with pytest.raises(ManifestError, match=r"Manifest 'memory://.*manifest.json' is not valid JSON .* rewrite"):
        load_manifest(memory_url)


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_unknown_format_version(memory_url: str, version: Any) -> None:
    write_dataset([{"x": 1}], memory_url, progress=False)
    _edit_manifest(memory_url, lambda d: d.update(version=version))
    with pytest.raises(ManifestError, match=rf"has format version {version!r}, but .* reads version 1\. Upgrade"):
        load_manifest(memory_url)


@pytest.mark.parametrize(
    "path",
    [
        "../escape.lps",
        "a/../../b.lps",
        "/etc/passwd",
        "s3://other/x.lps",
        "s3://other/..",
        "a\\b.lps",
        "",
        "./a.lps",
        "a//b.lps",
        "C:/x.lps",
        5,
        None,
    ],
)
def test_unsafe_shard_paths_are_refused_at_load_time(memory_url: str, path: Any) -> None:
    write_dataset([{"x": 1}], memory_url, progress=False)
    _edit_manifest(memory_url, lambda d: d["shards"][0].update(path=path))
    with pytest.raises(UnsafePathError, match=r"lists shard path .* could point outside the dataset root"):
        load_manifest(memory_url)


def test_validate_and_join_shard_paths() -> None:
    assert validate_shard_path("sub/shard-1.lps") == "sub/shard-1.lps"
    assert shard_url("s3://bucket/data/", "a.lps") == "s3://bucket/data/a.lps"
    assert shard_url("/tmp/ds", "b/a.lps") == "/tmp/ds/b/a.lps"
    with pytest.raises(UnsafePathError):
        shard_url("s3://bucket/data", "../other/a.lps")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["shards"][0].update(num_samples=-1), "malformed shard entry"),
        (lambda d: d["shards"][0].update(checksum="md5:00"), "malformed shard entry"),
        (lambda d: d.update(num_samples=99), "says num_samples=99, but its shards hold 1"),
        (lambda d: d.pop("schema"), "is malformed"),
        (lambda d: d["shards"].append(dict(d["shards"][0])), "twice"),
        (lambda d: d.update(sharding="size"), "is malformed"),
        (lambda d: d["shards"][0].update(label_counts=[1]), "expected an object of label field name"),
        (lambda d: d["shards"][0].update(label_counts={"x": [1, 1]}), r"summing to its num_samples=1"),
        (lambda d: d["shards"][0].update(label_counts={"x": [-1, 2]}), r"label_counts\['x'\]"),
        (lambda d: d["shards"][0].update(label_counts={"x": [0] * 65537}), "at most 65536"),
    ],
)
def test_malformed_manifests(memory_url: str, edit: Any, match: str) -> None:
    write_dataset([{"x": 1}], memory_url, progress=False)
    _edit_manifest(memory_url, edit)
    with pytest.raises(ManifestError, match=match):
        load_manifest(memory_url)


def test_missing_shard_raises_shard_not_found_with_its_url(memory_url: str) -> None:
    manifest = write_dataset([{"x": 1}], memory_url, progress=False)
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.rm(f"{root}/{manifest.shards[0].path}")
    load_manifest(memory_url)  # the manifest itself is fine
    expected = shard_url(memory_url, manifest.shards[0].path)
    with pytest.raises(ShardNotFoundError, match=f"Shard '{expected}' listed in the manifest does not exist"):
        verify_dataset(memory_url)
    with pytest.raises(FileNotFoundError):
        read_shard(memory_url, manifest.shards[0])


def test_corrupt_shard_raises_checksum_mismatch(memory_url: str) -> None:
    manifest = write_dataset([{"x": 1}], memory_url, progress=False)
    fs, root = fsspec.core.url_to_fs(memory_url)
    path = f"{root}/{manifest.shards[0].path}"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    # The one checksum message of the remote-read layer: the URL, both checksums, what to do.
    checksum = r"Checksum mismatch for memory://.*\.lps: expected sha256:[0-9a-f]{64} got sha256:[0-9a-f]{64}"
    with pytest.raises(ChecksumMismatchError, match=checksum + r" .* on 2 fetches in a row\. .* write the shard again"):
        verify_dataset(memory_url)
    read_shard(memory_url, manifest.shards[0], verify=False)  # opt-out reads whatever is there


def test_verify_checksum_message_names_url_expected_and_actual() -> None:
    shard = ShardInfo("a.lps", 1, 3, "sha256:" + "0" * 64)
    with pytest.raises(ChecksumMismatchError) as info:
        verify_checksum(b"abc", shard, "s3://b/a.lps")
    message = str(info.value)
    assert "s3://b/a.lps" in message
    assert "sha256:" + "0" * 64 in message
    assert "sha256:ba7816bf" in message


def test_publish_manifest_replaces_atomically(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    manifest = write_dataset([{"x": 1}], url, progress=False)
    publish_manifest(manifest, url)
    assert load_manifest(url) == manifest
    assert sorted(p.name for p in (tmp_path / "ds").iterdir() if not p.name.endswith(".lps")) == [MANIFEST_NAME]


# ---------------------------------------------------------------- what a wrong dataset URL says


@pytest.mark.parametrize("text", ['{"name": "my-project", "files": []}', "[1, 2]", '{"version": 1}'])
def test_other_json_is_not_a_lightning_patterns_manifest(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"'{tmp_path}/{MANIFEST_NAME}' is not a lightning_patterns manifest")
    assert "expected a JSON object with 'version', 'schema' and 'shards'" in message
    assert "Upgrade" not in message


def test_a_dataset_url_that_is_a_file_says_so(tmp_path: Path, memory_url: str) -> None:
    manifest = write_dataset([{"x": 1}], str(tmp_path / "ds"), progress=False)
    shard = f"{tmp_path}/ds/{manifest.shards[0].path}"
    with pytest.raises(ManifestError) as info:
        load_manifest(shard)
    message = str(info.value)
    assert message.startswith(f"Dataset URL '{shard}' is a file, not a dataset folder")
    assert f"(for example '{tmp_path}/ds')" in message
    assert "Errno" not in message
    fsspec.filesystem("memory").pipe_file(f"{memory_url}/data.bin", b"x")
    with pytest.raises(ManifestError, match=f"^Dataset URL '{memory_url}/data.bin' is a file, not a dataset folder"):
        load_manifest(f"{memory_url}/data.bin")


@pytest.mark.remote
def test_a_nonexistent_dataset_url_names_the_url_and_the_missing_manifest(tmp_path: Path) -> None:
    with serve_directory(tmp_path) as server:
        url = f"{server.url}/no-such-dataset"
        with pytest.raises(ManifestError) as info:
            load_manifest(url)
        requests = server.requests_for(f"no-such-dataset/{MANIFEST_NAME}")
    assert str(info.value).startswith(f"No dataset manifest at '{url}/{MANIFEST_NAME}'.")
    assert f"write_dataset(samples, '{url}')" in str(info.value)
    assert [r.status for r in requests] == [404], "a missing manifest must not be retried"


@pytest.mark.remote
def test_load_manifest_retries_a_transient_fault(tmp_path: Path) -> None:
    manifest = write_dataset([{"x": 1}], str(tmp_path), progress=False)
    with serve_directory(tmp_path) as server:
        server.inject(MANIFEST_NAME, "503", "truncate")
        assert load_manifest(server.url) == manifest
        assert verify_dataset(server.url) == manifest
        statuses = [r.status for r in server.requests_for(MANIFEST_NAME)]
    assert statuses[:2] == [503, 206]  # the retry succeeds (a range request: a manifest read is capped)
