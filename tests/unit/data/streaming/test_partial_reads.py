"""Reading parts of shards: random access (``dataset[i]``), ranks and workers that read only their own rows.

Every check compares with the bytes on disk, decoded by a ``ShardReader`` over the whole file.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from lightning_patterns.data.shards import ShardReader, load_manifest, write_dataset
from lightning_patterns.data.shards.reader import parse_header
from lightning_patterns.data.streaming import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.exceptions import ChecksumMismatchError

BLOCK = 4096
N = 2400


def _samples(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    return [
        {
            "index": np.int64(i),
            "image": rng.integers(0, 256, size=(6, 6), dtype=np.uint8),
            "text": f"sample {i} ü" * (i % 3),
        }
        for i in range(n)
    ]


@pytest.fixture
def blocked(tmp_path: Path) -> str:
    """A local dataset of shards with block tables (4 KiB blocks), some 20 KB each."""
    url = str(tmp_path / "blocked")
    write_dataset(_samples(N), url, shard_bytes=40_000, block_bytes=BLOCK, progress=False)
    assert len(load_manifest(url).shards) >= 4
    return url


def _on_disk(url: str) -> list[dict[str, Any]]:
    """Every sample, decoded from the whole shard files."""
    manifest = load_manifest(url)
    samples: list[dict[str, Any]] = []
    for shard in manifest.shards:
        samples.extend(ShardReader((Path(url) / shard.path).read_bytes(), manifest.schema))
    return samples


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_random_access_equals_the_bytes_on_disk_and_fetches_only_blocks(blocked: str) -> None:
    dataset = StreamingDataset(blocked, batch_size=16)
    expected = _on_disk(blocked)
    reader = dataset.sample_reader
    stats = reader.reader.stats
    order = np.random.default_rng(0).permutation(N).tolist()
    for i in [*order[:300], 0, N - 1]:
        before = stats.snapshot().bytes_read
        sample = dataset[i]
        fetched = stats.snapshot().bytes_read - before
        assert _same(sample, expected[i]), i
        # One or two blocks per region (image, index, text index and payload), plus a head the first time only.
        assert fetched <= 8 * BLOCK + 4096
    assert _same(dataset[-1], expected[N - 1])
    assert len(reader) == N
    with pytest.raises(IndexError, match=f"Sample index {N} is out of range for a dataset of {N} samples"):
        dataset[N]
    with pytest.raises(TypeError, match="A sample index must be an int, got str"):
        dataset["3"]  # type: ignore[index]


def test_the_map_style_view_reads_every_sample_once_in_any_order(blocked: str) -> None:
    view = StreamingDataset(blocked, batch_size=16).sample_reader.as_map_dataset()
    loader = DataLoader(view, batch_size=None, sampler=RandomSampler(view, generator=torch.Generator().manual_seed(0)))
    seen = [int(sample["index"]) for sample in loader]
    assert sorted(seen) == list(range(N))
    assert seen != list(range(N))


def test_ranks_that_share_a_shard_each_fetch_only_their_rows(blocked: str) -> None:
    manifest = load_manifest(blocked)
    expected = _on_disk(blocked)
    seen: list[int] = []
    remote = 0
    for rank in (0, 1):
        dataset = StreamingDataset(blocked, batch_size=16, rank=rank, world_size=2)
        for batch in dataset:
            for row, index in enumerate(batch["index"].tolist()):
                assert torch.equal(batch["image"][row], expected[index]["image"])
                assert batch["text"][row] == expected[index]["text"]
                seen.append(index)
        remote += int(dataset.metrics()["remote_bytes"])
    assert sorted(seen) == list(range(N))
    # The shard at the ranks' boundary is not fetched twice: besides the dataset's bytes, each rank reads its
    # head and the blocks at the boundary (one or two per region) only.
    straddle = max(shard.head_bytes or 0 for shard in manifest.shards)
    assert manifest.num_bytes <= remote <= manifest.num_bytes + 2 * straddle + 2 * 5 * BLOCK


def _corrupt_row(url: str, field: str, row: int) -> int:
    """Flip a byte of ``field`` of sample ``row`` (a global index); return the block that holds it."""
    manifest = load_manifest(url)
    offsets = np.cumsum([0] + [s.num_samples for s in manifest.shards])
    shard = int(np.searchsorted(offsets, row, side="right")) - 1
    path = Path(url) / manifest.shards[shard].path
    data = bytearray(path.read_bytes())
    header = parse_header(data, len(data))
    assert header.blocks is not None
    at = header.columns[field].offset + (row - int(offsets[shard])) * header.schema[field].sample_nbytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return header.blocks.blocks_of(at, at + 1)[0]


def test_a_corrupt_block_in_a_part_read_alone_fails_naming_the_block(blocked: str) -> None:
    # A row of the shard the two ranks share, in rank 1's part, several blocks away from rank 0's rows.
    offsets = np.cumsum([0] + [s.num_samples for s in load_manifest(blocked).shards])
    shard = int(np.searchsorted(offsets, N // 2, side="right")) - 1
    row = N // 2 + 150
    assert offsets[shard] < N // 2
    assert row < offsets[shard + 1]
    block = _corrupt_row(blocked, "image", row)
    with pytest.raises(ChecksumMismatchError, match=rf"block {block} of \d+ \(bytes \[\d+, \d+\)\) does not match"):
        list(StreamingDataset(blocked, batch_size=16, rank=1, world_size=2))
    with pytest.raises(ChecksumMismatchError, match=rf"block {block} of \d+"):
        StreamingDataset(blocked, batch_size=16)[row]
    assert sum(len(b["index"]) for b in StreamingDataset(blocked, batch_size=16, rank=0, world_size=2)) == N // 2


def test_a_corrupt_block_of_a_whole_shard_fails_naming_it_after_one_more_fetch(blocked: str) -> None:
    block = _corrupt_row(blocked, "image", 3)
    dataset = StreamingDataset(blocked, batch_size=16)
    with pytest.raises(ChecksumMismatchError, match=rf"block {block} of \d+ \(bytes"):
        list(dataset)
    assert dataset.metrics()["retries"] >= 1


def test_first_batch_time_is_reported(blocked: str) -> None:
    dataset = StreamingDataset(blocked, batch_size=16)
    loader = StreamingDataLoader(dataset)
    assert dataset.metrics()["first_batch_seconds"] == 0.0
    import time

    started = time.perf_counter()
    batches = sum(1 for _ in loader)
    elapsed = time.perf_counter() - started
    assert batches == len(dataset)
    for metrics in (dataset.metrics(), loader.metrics()):
        assert 0.0 < metrics["first_batch_seconds"] <= elapsed


@pytest.mark.distributed
def test_two_workers_read_each_sample_once_and_the_shard_they_share_once(blocked: str) -> None:
    # One launch of two DataLoader worker processes; the plan gives each a contiguous half, so one shard is
    # shared: each worker fetches only its rows of it.
    manifest = load_manifest(blocked)
    dataset = StreamingDataset(blocked, batch_size=16)
    loader = StreamingDataLoader(dataset, num_workers=2)
    seen = [index for batch in loader for index in batch["index"].tolist()]
    assert sorted(seen) == list(range(N))
    remote = int(loader.metrics()["remote_bytes"])
    straddle = max(shard.head_bytes or 0 for shard in manifest.shards)
    assert manifest.num_bytes <= remote <= manifest.num_bytes + 2 * straddle + 2 * 5 * BLOCK


def test_the_first_rows_of_every_column_come_in_the_first_pieces(tmp_path: Path) -> None:
    # A column whose first bytes share a block with the end of the column before it must get that block early:
    # with the block left to the earlier column's last piece, a shard's first batch waited for nearly all of it.
    from lightning_patterns.data.streaming.arrival import progressive_pieces

    url = str(tmp_path / "wide")
    rng = np.random.default_rng(3)
    samples = [{"image": rng.integers(0, 256, size=(28, 28), dtype=np.uint8), "label": np.int64(i)} for i in range(600)]
    write_dataset(samples, url, shard_bytes=1 << 20, block_bytes=BLOCK, progress=False)
    shard = load_manifest(url).shards[0]
    data = (Path(url) / shard.path).read_bytes()
    header = parse_header(data, len(data))
    table = header.blocks
    assert table is not None
    landed = table.start + BLOCK  # as if the first request brought one block of the body
    pieces = progressive_pieces(header, table, landed, chunk_bytes=8 * BLOCK)
    columns = sorted(header.columns.values(), key=lambda column: column.offset)
    assert (
        table.bounds(table.blocks_of(columns[-1].offset, columns[-1].offset + 1)[0])[0]
        < columns[0].offset + columns[0].nbytes
    ), "the test needs a shared block"
    first_need = {}
    for column in columns:
        first_block_start = table.bounds(table.blocks_of(column.offset, column.offset + 1)[0])[0]
        if first_block_start < landed:
            continue
        first_need[column.offset] = next(
            k for k, (start, stop) in enumerate(pieces) if start <= first_block_start < stop
        )
    # Every column's first block is in one of the first len(columns) pieces, and every block is fetched once.
    assert all(k < len(columns) for k in first_need.values()), (first_need, pieces[: len(columns) + 1])
    covered = sorted(pieces)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(covered))
    assert covered[0][0] == landed
    assert covered[-1][1] == len(data)
