"""Issue 16, item 1: malicious manifests and shard bodies are refused, naming the shard or manifest, the field
and both values, before any sample of the shard is yielded.

Each shard case corrupts shard 0 of a small dataset and records the new bytes' size and checksum in the
manifest, so the corruption is checksum-matching: only the format checks can catch it. Every case runs on
a local path and over HTTP (the test's own server on 127.0.0.1).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from attack_helpers import (
    HostileServer,
    edit_manifest,
    make_dataset,
    read_manifest_json,
    replace_shard,
    shard_bytes,
    split_shard,
    with_header,
    with_raw_header,
)

from lightning_patterns.data.shards import ShardFormatError, load_manifest, verify_dataset
from lightning_patterns.data.shards.limits import MAX_HEADER_BYTES, MAX_SHARD_SAMPLES
from lightning_patterns.data.streaming import ClassBalance, ReadAhead, StreamingDataset
from lightning_patterns.exceptions import ManifestError


@pytest.fixture(params=["local", "http"])
def serve(request: pytest.FixtureRequest, hostile: HostileServer) -> Callable[[Path], str]:
    """``serve(folder)``: the dataset's URL, as a local path or over HTTP (served as it is at that moment)."""
    if request.param == "local":
        return str
    return functools.partial(hostile.serve_folder, "data")


def _edit_count(delta: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        def change(manifest: dict[str, Any]) -> None:
            manifest["shards"][0]["num_samples"] += delta
            manifest["num_samples"] += delta

        edit_manifest(folder, change)

    return edit


def _edit_header(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda folder: replace_shard(folder, 0, with_header(shard_bytes(folder, 0), edit))


def _text_index(folder: Path) -> tuple[bytearray, int, np.ndarray]:
    data = bytearray(shard_bytes(folder, 0))
    header, _ = split_shard(bytes(data))
    at = header["fields"]["text"]["index_offset"]
    return data, at, np.frombuffer(bytes(data), dtype="<u8", count=header["num_samples"] + 1, offset=at).copy()


def _index_pointing_at_one_string(folder: Path) -> None:
    data, at, index = _text_index(folder)
    index[1:-1] = np.where(np.arange(1, len(index) - 1) % 2 == 1, index[1], 0)  # 0, a, 0, a, ...: one string
    data[at : at + index.nbytes] = index.tobytes()
    replace_shard(folder, 0, bytes(data))


def _index_past_payload(folder: Path) -> None:
    data, at, index = _text_index(folder)
    index[-1] += 1000
    data[at : at + index.nbytes] = index.tobytes()
    replace_shard(folder, 0, bytes(data))


def _invalid_utf8(folder: Path) -> None:
    data = bytearray(shard_bytes(folder, 0))
    header, _ = split_shard(bytes(data))
    payload = header["fields"]["text"]["offset"]
    data[payload] = 0xFF  # the first byte of sample 0's text
    replace_shard(folder, 0, bytes(data))


def _raw_header(text: bytes) -> Callable[[Path], None]:
    return lambda folder: replace_shard(folder, 0, with_raw_header(shard_bytes(folder, 0), text))


def _overlap(header: dict[str, Any]) -> None:
    header["fields"]["image"]["offset"] = header["fields"]["index"]["offset"]


# (case, corrupt shard 0 of the dataset in the folder, regex the message must match after the shard's URL)
SHARD_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("manifest_count_5_lower", _edit_count(-5), r"header field 'num_samples' is (\d+), but the manifest records "),
    ("manifest_count_5_higher", _edit_count(+5), r"header field 'num_samples' is (\d+), but the manifest records "),
    ("overlapping_columns", _edit_header(_overlap), r"the column of 'index' .* and the column of 'image' .* overlap"),
    (
        "column_into_header",
        _edit_header(lambda h: h["fields"]["index"].update(offset=16)),
        r"the column of 'index' spans bytes \[16, \d+\), outside the body \[\d+, \d+\)",
    ),
    (
        "index_outside_body",
        _edit_header(lambda h: h["fields"]["text"].update(index_offset=8)),
        r"the index of 'text' spans bytes \[8, \d+\), outside the body",
    ),
    ("index_pointing_at_one_string", _index_pointing_at_one_string, r"the index of field 'text' decreases at sample"),
    ("index_past_payload", _index_past_payload, r"the index of field 'text' runs from 0 to \d+, expected from 0 to"),
    ("invalid_utf8", _invalid_utf8, r"field 'text' of sample 0 is not valid UTF-8"),
    ("header_nested_200000_deep", _raw_header(b"[" * 200_000 + b"]" * 200_000), r"nests 200000 levels deep"),
    ("header_not_utf8", _raw_header(b'{"num_samples": "\xff\xfe"}'), r"its header is not valid JSON"),
    ("header_not_an_object", _raw_header(b"[1, 2]"), r"its header is a JSON list, expected an object"),
    (
        "header_over_the_limit",
        _raw_header(b" " * (MAX_HEADER_BYTES + 1)),
        rf"header length is {MAX_HEADER_BYTES + 1}, more than the {MAX_HEADER_BYTES} bytes",
    ),
    (
        "shape_0_by_2_62",
        _edit_header(lambda h: h["fields"]["image"].update(shape=[0, 2**62])),
        r"header field 'fields\['image'\]' has an invalid dtype or shape .*more than the \d+ bytes a whole shard",
    ),
    (
        "dtype_times_shape_times_count_is_not_bytes",
        _edit_header(lambda h: h["fields"]["index"].update(nbytes=h["fields"]["index"]["nbytes"] + 8)),
        r"header field 'fields\['index'\]\.nbytes' is (\d+), but (\d+) samples of int64 \(8 bytes each\) take",
    ),
    (
        "count_over_the_limit",
        _edit_header(lambda h: h.update(num_samples=2**62)),
        rf"header field 'num_samples' is {2**62}, expected a count from 0 to {MAX_SHARD_SAMPLES}",
    ),
    (
        "count_is_a_bool",
        _edit_header(lambda h: h.update(num_samples=True)),
        r"header field 'num_samples' is True, expected a count",
    ),
    (
        "offset_is_negative",
        _edit_header(lambda h: h["fields"]["index"].update(offset=-8)),
        r"header field 'fields\['index'\]\.offset' is -8, expected a byte offset",
    ),
]


@pytest.mark.parametrize(("case", "corrupt", "match"), SHARD_CASES, ids=[case[0] for case in SHARD_CASES])
def test_a_malicious_shard_fails_before_any_of_its_samples_naming_it(
    tmp_path: Path, serve: Callable[[Path], str], case: str, corrupt: Callable[[Path], None], match: str
) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    corrupt(folder)
    url = serve(folder)
    shard = f"{url}/{read_manifest_json(folder)['shards'][0]['path']}"
    yielded: list[Any] = []
    with pytest.raises(ShardFormatError) as info:
        yielded.extend(StreamingDataset(url, batch_size=4, read_ahead=ReadAhead(threads=1)))
    assert not yielded, "a sample of the corrupt shard (the first one read) was yielded before the error"
    message = str(info.value)
    assert message.startswith(f"Shard {shard!r}"), message
    assert re.search(match, message), f"{match!r} not in {message!r}"
    with pytest.raises(ShardFormatError, match=match):  # checking every shard up front finds it too
        verify_dataset(url)


def test_a_count_mismatch_names_both_values(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    manifest = make_dataset(folder)
    actual = manifest["shards"][0]["num_samples"]
    _edit_count(-5)(folder)
    with pytest.raises(ShardFormatError) as info:
        next(iter(StreamingDataset(str(folder), batch_size=4)))
    assert f"header field 'num_samples' is {actual}, but the manifest records num_samples={actual - 5}" in str(
        info.value
    )


def test_a_count_mismatch_is_caught_by_label_reads_too(tmp_path: Path, hostile: HostileServer) -> None:
    # Class balancing reads each shard's label column through range requests, before any shard is fetched.
    folder = tmp_path / "data"
    make_dataset(folder)
    _edit_count(+5)(folder)
    url = hostile.serve_folder("data", folder)
    with pytest.raises(ShardFormatError, match=r"header field 'num_samples' is \d+, but the manifest records"):
        StreamingDataset(url, batch_size=8, class_balance=ClassBalance(min_per_class=1, label_field="index"))


def _shard_entry(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest["shards"][0].update(values)


def _too_many_shards(manifest: dict[str, Any]) -> None:
    manifest["shards"] = manifest["shards"] * 2


# (case, edit of the manifest's JSON, regex the ManifestError must match)
MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("count_2_62", _shard_entry(num_samples=2**62), rf"records num_samples={2**62} for shard '.*', more than the "),
    ("bytes_1e12", _shard_entry(num_bytes=10**12), r"records num_bytes=1000000000000 for shard '.*', more than the "),
    (
        "count_without_the_bytes",
        _shard_entry(num_samples=10**6),
        r"records num_samples=1000000 but num_bytes=\d+ for shard .*take at least \d+ bytes",
    ),
    ("count_is_a_bool", _shard_entry(num_samples=True), r"malformed shard entry"),
    (
        "shape_0_by_2_62",
        lambda m: m["schema"]["image"].update(shape=[0, 2**62]),
        r"is malformed: Schema entry for field 'image' is invalid: .*more than the \d+ bytes a whole shard",
    ),
    ("shape_of_bools", lambda m: m["schema"]["image"].update(shape=[True, 4]), r"is malformed: "),
    ("total_disagrees", lambda m: m.update(num_samples=m["num_samples"] + 1), r"says num_samples=\d+, but its shards"),
    (
        "retired_is_not_a_list_of_paths",
        lambda m: m.update(retired=[{"generation": 1, "retired_at": 0, "shards": 1}]),
        r"is malformed: a 'retired' entry must have",
    ),
]


@pytest.mark.parametrize(("case", "edit", "match"), MANIFEST_CASES, ids=[case[0] for case in MANIFEST_CASES])
def test_a_manifest_beyond_the_limits_is_refused_at_load(
    tmp_path: Path, serve: Callable[[Path], str], case: str, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    edit_manifest(folder, edit)
    url = serve(folder)
    with pytest.raises(ManifestError, match=match) as info:
        StreamingDataset(url, batch_size=4)
    assert f"{url}/manifest.json" in str(info.value)
    with pytest.raises(ManifestError, match=match):
        load_manifest(url)


def test_more_shards_than_the_limit_are_refused_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real limit (2**20 shards) needs a 200 MB manifest; the check is the same with a smaller one.
    folder = tmp_path / "data"
    count = len(make_dataset(folder)["shards"])
    monkeypatch.setattr("lightning_patterns.data.shards.manifest.MAX_SHARDS", count - 1)
    with pytest.raises(ManifestError, match=rf"lists {count} shards, more than the {count - 1} a dataset may have"):
        load_manifest(str(folder))


def test_a_manifest_that_is_not_utf8_is_a_manifest_error(tmp_path: Path, serve: Callable[[Path], str]) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    (folder / "manifest.json").write_bytes(b'{"version": 1, "schema": "\xff\xfe\xfd"}')
    with pytest.raises(ManifestError, match=r"is not valid JSON \(.*utf-8"):
        load_manifest(serve(folder))
