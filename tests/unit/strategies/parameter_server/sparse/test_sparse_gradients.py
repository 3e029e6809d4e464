"""Dedup of a batch's ids, routes to servers, and gradients summed per unique row equal the dense gradient."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_patterns.strategies.parameter_server.sparse import (
    HashRowSharding,
    RowGradientAccumulator,
    route_ids,
    unique_ids,
)
from lightning_patterns.strategies.parameter_server.sparse.gradients import accumulate_rows


def test_unique_ids_remap_the_batch_onto_a_compact_table() -> None:
    ids = torch.randint(0, 50, (32, 3), generator=torch.Generator().manual_seed(0))
    unique, compact = unique_ids(ids)
    assert torch.equal(unique, torch.unique(ids))
    assert compact.shape == ids.shape
    assert torch.equal(unique[compact], ids)
    assert unique_ids(ids.int())[0].dtype == torch.int64
    with pytest.raises(TypeError, match=re.escape("Embedding ids must be int64 or int32, got torch.float32")):
        unique_ids(ids.float())


@pytest.mark.parametrize("mode", ["embedding", "sum", "mean"])
def test_compact_table_gradients_equal_the_dense_tables_rows(mode: str) -> None:
    """The design's worker side: a module run on pulled unique rows gets, per unique row, the dense gradient."""
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(100, 6, generator=generator)
    ids = torch.randint(0, 100, (16, 4), generator=generator)
    upstream = (
        torch.randn(16, 4, 6, generator=generator) if mode == "embedding" else torch.randn(16, 6, generator=generator)
    )

    def run(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if mode == "embedding":
            return F.embedding(index, weight)
        return F.embedding_bag(index, weight, mode=mode)

    dense = table.clone().requires_grad_(True)
    (run(dense, ids) * upstream).sum().backward()
    unique, compact = unique_ids(ids)
    rows = table[unique].clone().requires_grad_(True)
    output = run(rows, compact)
    torch.testing.assert_close(output, run(table, ids))
    (output * upstream).sum().backward()
    assert dense.grad is not None
    assert rows.grad is not None
    torch.testing.assert_close(rows.grad, dense.grad[unique])
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[unique] = False
    assert torch.equal(dense.grad[untouched], torch.zeros(int(untouched.sum()), 6))


def test_accumulate_rows_sums_repeats() -> None:
    unique, inverse = unique_ids(torch.tensor([5, 2, 5, 5, 9]))
    grads = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    summed = accumulate_rows(inverse, grads, unique.numel())
    expected = torch.zeros(10, 2).index_add_(0, torch.tensor([5, 2, 5, 5, 9]), grads)[unique]
    assert torch.equal(summed, expected)


def test_route_ids_partitions_positions_by_server() -> None:
    sharding = HashRowSharding(10_000, 3, salt=17)
    ids = torch.unique(torch.randint(0, 10_000, (500,), generator=torch.Generator().manual_seed(2)))
    routes = route_ids(ids, sharding)
    assert len(routes) == 3
    assert torch.equal(torch.sort(torch.cat(routes)).values, torch.arange(ids.numel()))
    for server, positions in enumerate(routes):
        assert bool((np.diff(positions.numpy()) > 0).all())
        assert (sharding.server_of(ids[positions]) == server).all()
    # Rows pulled per server and put back at their positions reassemble the batch's rows in order.
    values = ids.double().unsqueeze(1)
    rows = torch.empty_like(values)
    for positions in routes:
        rows[positions] = values[positions]
    assert torch.equal(rows, values)


def test_accumulator_sums_parts_and_divides_by_workers() -> None:
    accumulator = RowGradientAccumulator(dim=2)
    accumulator.add(torch.tensor([3, 1, 3]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    accumulator.add(torch.tensor([1, 7]), torch.tensor([[4.0, 4.0], [5.0, 5.0]]))
    assert accumulator.num_parts == 2
    ids, grads = accumulator.drain(divide_by=2)
    assert ids.tolist() == [1, 3, 7]
    assert grads.tolist() == [[3.0, 3.0], [2.0, 2.0], [2.5, 2.5]]
    assert accumulator.num_parts == 0
    empty_ids, empty_grads = accumulator.drain()
    assert empty_ids.shape == (0,)
    assert empty_grads.shape == (0, 2)
    with pytest.raises(
        ValueError, match=re.escape("Expected ids of shape [n] and torch.float32 gradients of shape [n, 2]")
    ):
        accumulator.add(torch.tensor([1]), torch.zeros(1, 3))
