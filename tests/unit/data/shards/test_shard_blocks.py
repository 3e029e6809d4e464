"""Per-block checksums: the table in the head, the manifest's head checksum, parts read and verified alone.

Also the compatibility promise: shards without a block table (written by earlier versions, or with
``block_bytes=None``) still read, whole, through every path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.remote import RemoteReader
from lightning_patterns.data.shards import (
    MANIFEST_NAME,
    Schema,
    ShardFormatError,
    ShardReader,
    encode_shard,
    load_manifest,
    shard_url,
    verify_dataset,
    write_dataset,
)
from lightning_patterns.data.shards.blocks import BlockTable
from lightning_patterns.data.shards.layout import DIGEST_BYTES
from lightning_patterns.data.shards.partial import fetch_head, fetch_rows, row_block_ranges
from lightning_patterns.data.shards.reader import parse_header
from lightning_patterns.exceptions import ChecksumMismatchError, ManifestError

BLOCK = 4096


def _samples(n: int) -> list[dict[str, Any]]:
    """Fixed-size fields beside variable-length ones, so that every kind of region is read in parts."""
    rng = np.random.default_rng(n)
    return [
        {
            "index": np.int64(i),
            "image": rng.integers(0, 256, size=(8, 8), dtype=np.uint8),
            "name": f"sample {i} é" * (i % 4),
            "blob": bytes([i % 256]) * (i % 7),
        }
        for i in range(n)
    ]


def _write(folder: Path, n: int = 3000, **options: Any) -> str:
    url = str(folder)
    write_dataset(_samples(n), url, shard_bytes=96 * 1024, block_bytes=BLOCK, progress=False, **options)
    return url


class _Ranges:
    """``read_range`` over a local shard file that records the byte ranges asked for."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.asked: list[tuple[int, int]] = []

    def read_range(self, start: int, stop: int) -> bytes:
        self.asked.append((start, stop))
        return self.data[start:stop]

    def fetch(self, ranges: list[tuple[int, int]], buffer: memoryview) -> None:
        for start, stop in ranges:
            buffer[start:stop] = self.read_range(start, stop)

    @property
    def bytes_read(self) -> int:
        return sum(stop - start for start, stop in self.asked)


def test_the_head_holds_a_digest_of_every_block_and_the_manifest_vouches_for_the_head(tmp_path: Path) -> None:
    url = _write(tmp_path / "d")
    manifest = load_manifest(url)
    assert len(manifest.shards) >= 3
    for shard in manifest.shards:
        data = (tmp_path / "d" / shard.path).read_bytes()
        header = parse_header(data, len(data))
        assert header.blocks is not None
        table = header.blocks
        assert (table.block_bytes, table.start, table.count) == (
            BLOCK,
            shard.head_bytes,
            -(-(len(data) - table.start) // BLOCK),
        )
        assert shard.head_checksum == "sha256:" + hashlib.sha256(data[: table.start]).hexdigest()
        assert shard.checksum == "sha256:" + hashlib.sha256(data).hexdigest()  # the whole file, as before
        for block in range(table.count):
            start, stop = table.bounds(block)
            digest = data[table.table_offset + block * DIGEST_BYTES : table.table_offset + (block + 1) * DIGEST_BYTES]
            assert digest == hashlib.sha256(data[start:stop]).digest()
        # Every column lies in the body the blocks cover.
        assert all(extent.offset >= table.start for extent in header.columns.values())
    entry = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())["shards"][0]
    assert {"head_bytes", "head_checksum"} <= set(entry)


@pytest.mark.parametrize("n", [1, 2, 40])
def test_a_body_of_one_block_gets_no_table_and_is_the_format_of_earlier_versions(n: int) -> None:
    samples = _samples(n)
    schema = Schema.infer(samples[0])
    data = encode_shard(samples, schema)
    assert len(data) - parse_header(data, len(data)).columns["index"].offset <= 64 * 1024
    assert parse_header(data, len(data)).blocks is None
    assert data == encode_shard(samples, schema, block_bytes=None)


def test_any_rows_read_alone_equal_the_whole_shard_and_cost_only_their_blocks(tmp_path: Path) -> None:
    url = _write(tmp_path / "d")
    manifest = load_manifest(url)
    shard = manifest.shards[1]
    path = tmp_path / "d" / shard.path
    whole = ShardReader(path.read_bytes(), manifest.schema)
    for rows in (
        [(0, 1)],
        [(5, 17), (300, 301)],
        [(shard.num_samples - 3, shard.num_samples)],
        [(0, shard.num_samples)],
    ):
        source = _Ranges(path)
        head = fetch_head(source.read_range, shard, manifest.schema, str(path))
        part = fetch_rows(head, rows, source.fetch)
        assert part.rows == rows
        for start, stop in rows:
            expected, got = whole.read_range(start, stop), part.read_range(start, stop)
            for name in ("index", "image"):
                np.testing.assert_array_equal(got[name].numpy(), expected[name].numpy())
            assert got["name"] == expected["name"]
            assert got["blob"] == expected["blob"]
        # The head, then whole blocks holding those rows of each field (an index and its payload for the
        # variable-length ones): at most two blocks more per region than the rows themselves take.
        needed = sum(stop - start for start, stop in rows)
        bound = shard.head_bytes + (needed * shard.num_bytes) // shard.num_samples + 2 * 6 * BLOCK * len(rows)
        assert source.bytes_read <= min(bound, shard.num_bytes)
        assert source.asked[0] == (0, shard.head_bytes)  # one request for the head
    missing = [row for row in range(shard.num_samples) if not any(a <= row < b for a, b in [(5, 17), (300, 301)])]
    source = _Ranges(path)
    part = fetch_rows(
        fetch_head(source.read_range, shard, manifest.schema, str(path)), [(5, 17), (300, 301)], source.fetch
    )
    with pytest.raises(IndexError, match=r"Rows \[4, 5\) of .* were not fetched: this partial shard holds rows"):
        part.read(4)
    with pytest.raises(IndexError, match="were not fetched"):
        part.read_batch(missing[:3])
    with pytest.raises(IndexError, match="were not fetched"):
        part.read_range(16, 18)


def test_row_block_ranges_are_whole_merged_blocks(tmp_path: Path) -> None:
    url = _write(tmp_path / "d")
    manifest = load_manifest(url)
    shard = manifest.shards[0]
    source = _Ranges(tmp_path / "d" / shard.path)
    head = fetch_head(source.read_range, shard, manifest.schema, "s")
    ranges = row_block_ranges(head, [(10, 20), (15, 40)])
    table = head.blocks
    assert ranges == sorted(ranges)
    for start, stop in ranges:
        assert (start - table.start) % BLOCK == 0
        assert (stop - table.start) % BLOCK == 0 or stop == shard.num_bytes
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(ranges))  # merged


def _corrupt_block(path: Path, block: int) -> tuple[int, int]:
    data = bytearray(path.read_bytes())
    table = parse_header(data, len(data)).blocks
    assert table is not None
    start, stop = table.bounds(block)
    data[(start + stop) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return start, stop


def test_corruption_in_one_block_is_detected_naming_the_block_and_the_rest_still_reads(tmp_path: Path) -> None:
    url = _write(tmp_path / "d")
    manifest = load_manifest(url)
    shard = manifest.shards[0]
    path = tmp_path / "d" / shard.path
    whole = ShardReader(path.read_bytes(), manifest.schema)
    image = whole.header.columns["image"]
    table = whole.header.blocks
    assert table is not None
    block = table.blocks_of(image.offset + 200 * 64, image.offset + 201 * 64)[0]  # the block holding row 200's image
    start, stop = _corrupt_block(path, block)
    source = _Ranges(path)
    head = fetch_head(source.read_range, shard, manifest.schema, shard_url(url, shard.path))
    with pytest.raises(ChecksumMismatchError) as info:
        fetch_rows(head, [(200, 201)], source.fetch)
    message = str(info.value)
    assert f"block {block} of {table.count} (bytes [{start}, {stop}))" in message
    assert shard_url(url, shard.path) in message
    # Rows whose blocks are intact still read.
    assert int(fetch_rows(head, [(0, 1)], source.fetch).read(0)["index"]) == 0


def test_a_corrupt_head_is_refused_against_the_manifest(tmp_path: Path) -> None:
    url = _write(tmp_path / "d")
    manifest = load_manifest(url)
    shard = manifest.shards[0]
    path = tmp_path / "d" / shard.path
    data = bytearray(path.read_bytes())
    data[shard.head_bytes - 1] ^= 0x01  # the last byte of the block table
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"its head \(bytes \[0, \d+\): header and block table\) does"):
        fetch_head(_Ranges(path).read_range, shard, manifest.schema, str(path))


def _with_blocks(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    (length,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + length])
    edit(header["blocks"])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    return data[:16] + text.ljust(length, b" ") + data[16 + length :]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.update(algorithm="md5"), r"header field 'blocks.algorithm' is 'md5', expected 'sha256'"),
        (lambda b: b.update(block_bytes=64), r"header field 'blocks.block_bytes' is 64, less than the 4096 allowed"),
        (lambda b: b.update(count=b["count"] + 1), r"header field 'blocks.count' is \d+, but a body of \d+ bytes in"),
        (lambda b: b.update(start=-1), r"header field 'blocks.start' is -1, expected a byte offset or count"),
        (lambda b: b.update(table_offset=20), r"its block table spans bytes \[20, \d+\) and its body starts at byte"),
        (
            lambda b: b.update(start=b["start"] + 64),
            r"the column of 'index' spans bytes \[\d+, \d+\), outside the body",
        ),
    ],
)
def test_a_hostile_block_table_is_refused_before_any_sample(edit: Any, match: str) -> None:
    samples = _samples(3000)
    data = encode_shard(samples[:1500], Schema.infer(samples[0]), block_bytes=BLOCK)
    with pytest.raises(ShardFormatError, match=match):
        ShardReader(_with_blocks(data, edit))


@pytest.mark.parametrize(
    "head",
    [
        {"head_bytes": 100},  # a checksum missing
        {"head_checksum": "sha256:" + "0" * 64},  # a size missing
        {"head_bytes": 8, "head_checksum": "sha256:" + "0" * 64},  # shorter than the prefix
        {"head_bytes": 10**12, "head_checksum": "sha256:" + "0" * 64},  # beyond the file
        {"head_bytes": 100, "head_checksum": "md5:00"},
    ],
)
def test_a_malformed_head_entry_in_the_manifest_is_refused(tmp_path: Path, head: dict[str, Any]) -> None:
    url = _write(tmp_path / "d", n=1500)
    manifest_path = tmp_path / "d" / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["shards"][0].pop("head_bytes")
    data["shards"][0].pop("head_checksum")
    data["shards"][0].update(head)
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"expected both or neither: a byte count from 16 to its num_bytes="):
        load_manifest(url)


def test_block_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match=r"`block_bytes` must be a number of bytes >= 4096 or None \(no block table\)"):
        write_dataset([{"x": 1}], "memory://blocks/bad", block_bytes=100, progress=False)


def test_block_table_verify_needs_whole_blocks() -> None:
    table = BlockTable(block_bytes=BLOCK, start=128, table_offset=64, count=2, size=128 + BLOCK + 10)
    assert table.bounds(1) == (128 + BLOCK, 128 + BLOCK + 10)
    assert list(table.blocks_of(130, 128 + BLOCK + 1)) == [0, 1]
    assert table.widen(130, 131) == (128, 128 + BLOCK)
    with pytest.raises(ValueError, match="do not start and end on block boundaries"):
        table.verify(b"x" * 10, 130, b"\0" * 64, None)


# ---------------------------------------------------------------- shards without a block table still read

# The sha256 of the shard below as written by the writer before block tables existed (main at 5a7d9b7):
# shards written with block_bytes=None are byte for byte that format.
_LEGACY_SAMPLES_DIGEST = "0d3b8a639e2d33b5cf7b033c8d14535783ef13e3d6c05b9a0ee404f64896d43f"


def _legacy_samples() -> list[dict[str, Any]]:
    return [
        {"image": np.full((4, 4), i, dtype=np.uint8), "label": i % 3, "name": f"s{i}", "blob": bytes([i]) * i}
        for i in range(50)
    ]


@pytest.fixture
def legacy_dataset(tmp_path: Path) -> str:
    """A dataset whose shards and manifest have no block table: the format earlier versions wrote."""
    samples = _legacy_samples()
    assert hashlib.sha256(encode_shard(samples, Schema.infer(samples[0]), block_bytes=None)).hexdigest() == (
        _LEGACY_SAMPLES_DIGEST
    )
    url = str(tmp_path / "legacy")
    rows = [{**s, "image": np.tile(s["image"], (16, 16))} for s in samples * 40]
    write_dataset(rows, url, shard_bytes=200_000, block_bytes=None, progress=False)
    for shard in load_manifest(url).shards:
        data = (tmp_path / "legacy" / shard.path).read_bytes()
        assert parse_header(data, len(data)).blocks is None
    text = (tmp_path / "legacy" / MANIFEST_NAME).read_text()
    assert "head_bytes" not in text
    return url


def test_shards_without_a_block_table_still_read_whole_and_at_random(legacy_dataset: str) -> None:
    from lightning_patterns.data.streaming import StreamingDataset

    manifest = verify_dataset(legacy_dataset)
    assert len(manifest.shards) >= 3
    assert not any(shard.has_blocks for shard in manifest.shards)
    dataset = StreamingDataset(legacy_dataset, batch_size=64)
    labels = [int(v) for batch in dataset for v in batch["label"]]
    assert labels == [i % 3 for i in range(50)] * 40
    # Rank 1 of 2 reads part of a shard: without a block table the whole shard is fetched and verified.
    second = StreamingDataset(legacy_dataset, batch_size=64, rank=1, world_size=2)
    assert sum(len(batch["label"]) for batch in second) == 1000
    assert dataset[51]["name"] == "s1"
    assert dataset[-1]["blob"] == bytes([49]) * 49
    assert int(dataset[1999]["label"]) == 49 % 3


def test_a_reader_ignores_block_checks_of_a_shard_read_through_a_remote(tmp_path: Path) -> None:
    # fetch_head needs the manifest's head entry; a shard without one is refused with what to do instead.
    url = str(tmp_path / "legacy")
    write_dataset(_samples(2000), url, shard_bytes=96 * 1024, block_bytes=None, progress=False)
    shard = load_manifest(url).shards[0]
    reader = RemoteReader(url)
    with pytest.raises(ValueError, match="has no block table recorded in the manifest, so it can only be read whole"):
        fetch_head(lambda a, b: reader.read_range(shard.path, a, b), shard, None, "x")
