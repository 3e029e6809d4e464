"""Table specs and row initialisers: nn.Embedding's distribution, a pure function of (seed, table, row)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from lightning_patterns.strategies.parameter_server.sparse import RowInitializer, TableSpec


def test_default_initializer_draws_what_nn_embedding_draws() -> None:
    """N(0, 1) per element: the moments of 400k values agree with torch's nn.Embedding init within sampling error."""
    ours = TableSpec("items", num_rows=100_000, dim=4).initial_rows(np.arange(100_000)).double()
    torchs = torch.nn.Embedding(100_000, 4).weight.detach().double()
    for values in (ours, torchs):
        assert abs(values.mean().item()) < 0.01
        assert abs(values.std().item() - 1.0) < 0.01
        # A tail probability of the standard normal: P(|x| > 2) = 0.0455.
        assert abs((values.abs() > 2).double().mean().item() - 0.0455) < 0.002
    # Components of a row are independent of each other.
    correlation = torch.corrcoef(ours.T)
    assert (correlation - torch.eye(4)).abs().max() < 0.02


def test_initial_rows_depend_only_on_seed_table_and_row() -> None:
    table = TableSpec("items", num_rows=1_000, dim=3, seed=5)
    everything = table.initial_rows(np.arange(1_000))
    shuffled = np.random.default_rng(0).permutation(1_000)[:100]
    assert torch.equal(table.initial_rows(shuffled), everything[shuffled])
    assert torch.equal(table.initial_rows(torch.from_numpy(shuffled)), everything[shuffled])
    assert not torch.equal(TableSpec("users", 1_000, 3, seed=5).initial_rows(np.arange(10)), everything[:10])
    assert not torch.equal(TableSpec("items", 1_000, 3, seed=6).initial_rows(np.arange(10)), everything[:10])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_dtypes_and_other_distributions(dtype: str) -> None:
    normal = TableSpec("t", 2_000, 8, dtype=dtype, initializer=RowInitializer("normal", mean=3.0, std=0.5))
    rows = normal.initial_rows(np.arange(2_000))
    assert rows.dtype == getattr(torch, dtype)
    assert abs(rows.double().mean().item() - 3.0) < 0.02
    assert abs(rows.double().std().item() - 0.5) < 0.02
    uniform = TableSpec("t", 2_000, 8, initializer=RowInitializer("uniform", low=-0.1, high=0.3)).initial_rows(
        np.arange(2_000)
    )
    assert uniform.min() >= -0.1
    assert uniform.max() < 0.3
    assert abs(uniform.mean().item() - 0.1) < 0.005
    assert torch.equal(
        TableSpec("t", 5, 2, initializer=RowInitializer("zeros")).initial_rows(np.arange(5)), torch.zeros(5, 2)
    )


def test_padding_row_starts_at_zero_and_json_round_trips() -> None:
    table = TableSpec("t", 10, 3, padding_idx=-2, initializer=RowInitializer(std=2.0), seed=4)
    assert table.padding_idx == 8
    rows = table.initial_rows(np.arange(10))
    assert torch.equal(rows[8], torch.zeros(3))
    assert bool((rows[:8] != 0).all())
    assert TableSpec.from_json(table.to_json()) == table
    assert table.row_nbytes == 12


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TableSpec("", 10, 2), "A table needs a non-empty `name`"),
        (lambda: TableSpec("t", 0, 2), "Table 't' needs a positive int `num_rows`, got num_rows=0"),
        (lambda: TableSpec("t", 10, 2.5), "needs a positive int `dim`, got dim=2.5"),
        (lambda: TableSpec("t", 10, 2, dtype="int64"), "Table 't' has dtype='int64'; expected one of float32"),
        (lambda: TableSpec("t", 10, 2, padding_idx=10), "padding_idx=10 outside its 10 rows"),
        (lambda: RowInitializer("xavier"), "RowInitializer(distribution='xavier') is not supported"),
        (lambda: RowInitializer(std=-1.0), "RowInitializer needs std >= 0"),
        (lambda: RowInitializer("uniform", low=1.0, high=0.0), "RowInitializer needs low <= high"),
        (lambda: TableSpec.from_json({"name": "t"}), "Invalid table description"),
    ],
)
def test_invalid_arguments(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
