"""Invariants of row sharding: every row on exactly one server, a stable rule, re-sharding keeps every row."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_patterns.strategies.parameter_server.sparse import (
    ROW_SHARDINGS,
    HashRowSharding,
    RangeRowSharding,
    RowSGD,
    RowSharding,
    RowStore,
    TableSpec,
    load_shard,
    save_shard,
    write_manifest,
)
from lightning_patterns.strategies.parameter_server.sparse.checkpoint import TableCheckpoint

_MASK = 2**64 - 1


def _splitmix64_reference(value: int) -> int:
    """SplitMix64's output function in Python integers (Steele et al. 2014), independent of numpy."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@st.composite
def shardings(draw: st.DrawFn) -> RowSharding:
    num_rows = draw(st.integers(1, 5_000))
    num_servers = draw(st.integers(1, 9))
    if draw(st.sampled_from(ROW_SHARDINGS.names())) == "range":
        return RangeRowSharding(num_rows, num_servers)
    return HashRowSharding(num_rows, num_servers, salt=draw(st.integers(0, _MASK)))


@given(shardings())
def test_every_row_is_on_exactly_one_server(sharding: RowSharding) -> None:
    held = [sharding.rows_of(server) for server in range(sharding.num_servers)]
    everything = np.concatenate(held)
    assert np.array_equal(np.sort(everything), np.arange(sharding.num_rows))  # all rows, none twice
    for server, rows in enumerate(held):
        assert (sharding.server_of(rows) == server).all()
        assert np.array_equal(rows, np.sort(rows))
    assert sharding.counts().tolist() == [len(rows) for rows in held]


@given(shardings(), st.lists(st.integers(0, 10**9), min_size=1, max_size=50))
def test_the_rule_is_stable(sharding: RowSharding, raw: list[int]) -> None:
    ids = np.array([value % sharding.num_rows for value in raw], dtype=np.int64)
    servers = sharding.server_of(ids)
    # The same answer id by id, in any order and batching, from a copy rebuilt from its JSON, and from torch ids.
    assert [int(sharding.server_of(ids[i : i + 1])[0]) for i in range(len(ids))] == servers.tolist()
    permutation = np.random.default_rng(len(raw)).permutation(len(ids))
    assert np.array_equal(sharding.server_of(ids[permutation]), servers[permutation])
    assert np.array_equal(sharding.resharded(sharding.num_servers).server_of(torch.from_numpy(ids)), servers)
    if isinstance(sharding, HashRowSharding):
        expected = [_splitmix64_reference(int(i) ^ sharding.salt) % sharding.num_servers for i in ids]
    else:
        expected = [
            max(s for s in range(sharding.num_servers) if s * sharding.num_rows // sharding.num_servers <= i)
            for i in ids
        ]
    assert servers.tolist() == expected


@given(st.integers(1, 10_000), st.integers(1, 16))
def test_range_sizes_differ_by_at_most_one(num_rows: int, num_servers: int) -> None:
    counts = RangeRowSharding(num_rows, num_servers).counts()
    assert counts.sum() == num_rows
    assert counts.max() - counts.min() <= 1


@given(st.integers(0, _MASK), st.integers(2, 8))
def test_hash_balance_within_binomial_bounds(salt: int, num_servers: int) -> None:
    num_rows = 20_000
    counts = HashRowSharding(num_rows, num_servers, salt=salt).counts()
    mean = num_rows / num_servers
    spread = 5 * (mean * (1 - 1 / num_servers)) ** 0.5  # five standard deviations of a binomial count
    assert (abs(counts - mean) <= spread).all(), counts


@settings(max_examples=20)  # each example writes and reads a checkpoint: keep the suite fast
@given(shardings(), st.integers(1, 7), st.data())
def test_resharding_through_a_checkpoint_keeps_every_row(
    sharding: RowSharding, new_servers: int, data: st.DataObject
) -> None:
    table = TableSpec("t", sharding.num_rows, 2)
    touched = np.unique(np.array(data.draw(st.lists(st.integers(0, sharding.num_rows - 1), min_size=1, max_size=40))))
    servers = sharding.server_of(touched)
    stores = []
    for server in range(sharding.num_servers):
        store = RowStore(table, sharding, server, RowSGD(lr=1.0))
        mine = torch.from_numpy(touched[servers == server])
        store.apply(mine, torch.ones(len(mine), 2))
        stores.append(store)
    expected = table.initial_rows(touched) - 1.0
    with tempfile.TemporaryDirectory() as directory:
        entries = tuple(save_shard(directory, 0, store) for store in stores)
        write_manifest(directory, [TableCheckpoint(0, table, sharding, RowSGD(lr=1.0), 1, entries)])
        resharded = sharding.resharded(new_servers)
        found: dict[int, torch.Tensor] = {}
        for server in range(new_servers):
            (ids, values, _), _ = load_shard(directory, "t", resharded, server)
            assert (resharded.server_of(ids) == server).all()
            for row, value in zip(ids.tolist(), values, strict=True):
                assert row not in found
                found[row] = value
    assert sorted(found) == touched.tolist()
    assert torch.equal(torch.stack([found[int(row)] for row in touched]), expected)
