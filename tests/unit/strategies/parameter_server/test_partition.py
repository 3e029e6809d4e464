"""The partition of parameters over servers: disjoint, complete, byte-balanced, chunk-bounded (property tests)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.strategies.parameter_server.partition import Chunk, partition_parameters, server_loads

shapes = st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=12)
itemsize = st.sampled_from([1, 2, 4, 8])


def _check_disjoint_and_complete(chunks: list[Chunk], numels: list[int]) -> None:
    by_tensor: dict[int, list[Chunk]] = defaultdict(list)
    for chunk in chunks:
        assert 0 <= chunk.start < chunk.stop <= numels[chunk.tensor]
        by_tensor[chunk.tensor].append(chunk)
    for index, numel in enumerate(numels):
        pieces = sorted(by_tensor[index], key=lambda c: c.start)
        covered = 0
        for piece in pieces:
            assert piece.start == covered, "chunks must neither overlap nor leave a gap"
            covered = piece.stop
        assert covered == numel


@given(numels=shapes, size=itemsize, num_servers=st.integers(1, 9), chunk_items=st.none() | st.integers(1, 700))
def test_one_dtype_partition_is_disjoint_complete_and_balanced_to_one_element(
    numels: list[int], size: int, num_servers: int, chunk_items: int | None
) -> None:
    chunk_bytes = None if chunk_items is None else chunk_items * size
    itemsizes = [size] * len(numels)
    chunks = partition_parameters(numels, itemsizes, num_servers, chunk_bytes)
    _check_disjoint_and_complete(chunks, numels)
    loads = server_loads(chunks, itemsizes, num_servers)
    assert sum(loads) == sum(numels) * size
    # Loads differ by at most one element, so by far less than one chunk.
    assert max(loads) - min(loads) <= size
    if chunk_bytes is not None:
        assert all(c.numel * size <= chunk_bytes for c in chunks)
    assert chunks == sorted(chunks, key=lambda c: (c.server, c.tensor, c.start))


@given(
    tensors=st.lists(st.tuples(st.integers(0, 3000), itemsize), min_size=1, max_size=10),
    num_servers=st.integers(1, 6),
    chunk_bytes=st.none() | st.integers(8, 4096),
)
def test_mixed_dtype_partition_stays_within_one_chunk(
    tensors: list[tuple[int, int]], num_servers: int, chunk_bytes: int | None
) -> None:
    numels = [n for n, _ in tensors]
    itemsizes = [s for _, s in tensors]
    chunks = partition_parameters(numels, itemsizes, num_servers, chunk_bytes)
    _check_disjoint_and_complete(chunks, numels)
    loads = server_loads(chunks, itemsizes, num_servers)
    largest_item = max(itemsizes)
    assert max(loads) - min(loads) <= 2 * largest_item
    if chunk_bytes is not None:
        assert all(c.numel * itemsizes[c.tensor] <= chunk_bytes for c in chunks)


def test_one_large_tensor_is_split_over_servers() -> None:
    # One big embedding next to small biases: whole-tensor placement would put it all on one server.
    numels = [1_000_000, 10, 10]
    chunks = partition_parameters(numels, [4, 4, 4], num_servers=4)
    assert {c.server for c in chunks if c.tensor == 0} == {0, 1, 2, 3}
    assert server_loads(chunks, [4, 4, 4], 4) == [1_000_020, 1_000_020, 1_000_020, 1_000_020]


def test_partition_is_deterministic() -> None:
    args = ([7, 300, 5, 1024], [4, 4, 4, 4], 3, 256)
    assert partition_parameters(*args) == partition_parameters(*args)


@pytest.mark.parametrize(
    ("numels", "itemsizes", "num_servers", "chunk_bytes", "match"),
    [
        ([1, 2], [4], 1, None, "same length"),
        ([1], [4], 0, None, "num_servers"),
        ([-1], [4], 1, None, "numels"),
        ([1], [0], 1, None, "itemsizes"),
        ([1], [8], 1, 4, "chunk_bytes"),
    ],
)
def test_invalid_arguments(
    numels: list[int], itemsizes: list[int], num_servers: int, chunk_bytes: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        partition_parameters(numels, itemsizes, num_servers, chunk_bytes)
