"""A server's row store: rows created on first use with the table's initialiser, ownership checked, exported whole."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from lightning_patterns.strategies.parameter_server.sparse import (
    HashRowSharding,
    RangeRowSharding,
    RowAdam,
    RowInitializer,
    RowSGD,
    RowStore,
    TableSpec,
)


def _hash_store(num_rows: int = 1000, dim: int = 4, server: int = 0, optimizer: Any = None) -> RowStore:
    table = TableSpec("items", num_rows, dim)
    sharding = HashRowSharding(num_rows, 2, salt=table.salt)
    return RowStore(table, sharding, server, optimizer or RowAdam(lr=0.1))


def _owned(store: RowStore, count: int) -> torch.Tensor:
    return torch.from_numpy(store.sharding.rows_of(store.server)[:count])


def test_rows_are_created_on_first_pull_with_the_tables_initial_values() -> None:
    store = _hash_store()
    ids = _owned(store, 50)
    assert store.num_created == 0
    rows = store.pull(ids[:20])
    assert store.num_created == 20
    assert torch.equal(rows, store.table.initial_rows(ids[:20]))
    # Pulling again, interleaved with new rows and repeats, creates only the new ones and returns the same values.
    again = store.pull(torch.cat([ids[30:40], ids[:20], ids[:5]]))
    assert store.num_created == 30
    assert torch.equal(again[10:30], rows)
    assert torch.equal(again[30:], rows[:5])


def test_prepare_creates_missing_rows_ahead_of_the_pull_with_the_same_values() -> None:
    store, reference = _hash_store(), _hash_store()
    ids = _owned(store, 40)
    store.pull(ids[:10])
    store.prepare(torch.cat([ids[5:30], ids[20:25]]))  # some created already, some repeated
    assert store.num_created == 30
    assert torch.equal(store.pull(ids[:30]), reference.pull(ids[:30]))
    assert store.num_created == 30
    with pytest.raises(ValueError, match="got rows it does not hold"):
        store.prepare(torch.from_numpy(store.sharding.rows_of(1)[:2]))


def test_memory_grows_with_touched_rows_not_with_the_table() -> None:
    small, large = _hash_store(num_rows=1_000), _hash_store(num_rows=10_000_000)
    for store in (small, large):
        candidates = np.arange(1_000)
        store.pull(torch.from_numpy(candidates[store.sharding.server_of(candidates) == 0][:300]))
    # The same rows touched cost the same bytes and storage, whatever the table size (the index aside).
    assert small.num_created == large.num_created == 300
    assert small.nbytes == large.nbytes == 300 * (4 * 4 * 3 + 8)
    assert large.capacity == 1024  # the smallest allocation; the small table caps it at its 1,000 rows
    assert small.capacity == 1000


def test_apply_updates_only_the_given_rows_and_counts_steps() -> None:
    store = _hash_store(optimizer=RowSGD(lr=0.5))
    ids = _owned(store, 10)
    before = store.pull(ids)
    store.apply(ids[:3], torch.ones(3, 4))
    after = store.pull(ids)
    assert torch.equal(after[:3], before[:3] - 0.5)
    assert torch.equal(after[3:], before[3:])
    assert store.step == 1


def test_assign_sets_values_and_resets_optimizer_state() -> None:
    store = _hash_store(optimizer=RowAdam(lr=0.1))
    ids = _owned(store, 4)
    store.apply(ids, torch.ones(4, 4))
    store.assign(ids[:2], torch.zeros(2, 4))
    assert torch.equal(store.pull(ids[:2]), torch.zeros(2, 4))
    exported_ids, _, state = store.export()
    assigned = torch.isin(exported_ids, ids[:2])
    assert torch.equal(state["exp_avg"][assigned], torch.zeros(2, 4))
    assert bool((state["exp_avg"][~assigned] != 0).all())


def test_export_then_load_restores_rows_state_and_step() -> None:
    store = _hash_store()
    ids = _owned(store, 40)[torch.randperm(40)]
    store.apply(ids[:25], torch.randn(25, 4))
    store.apply(ids[10:40], torch.randn(30, 4))
    exported_ids, values, state = store.export()
    assert torch.equal(exported_ids, torch.sort(ids).values)
    fresh = _hash_store()
    fresh.load(exported_ids, values, state, store.step)
    assert fresh.step == 2
    assert torch.equal(fresh.pull(ids), store.pull(ids))
    grads = torch.randn(40, 4)
    store.apply(ids, grads)
    fresh.apply(ids, grads)
    assert torch.equal(fresh.pull(ids), store.pull(ids))  # the optimizer state came back too


def test_initializers_and_padding_row() -> None:
    table = TableSpec("t", 100, 3, initializer=RowInitializer("uniform", low=2.0, high=3.0), padding_idx=7)
    store = RowStore(table, RangeRowSharding(100, 1), 0, RowSGD())
    rows = store.pull(torch.arange(100))
    assert torch.equal(rows[7], torch.zeros(3))
    others = torch.cat([rows[:7], rows[8:]])
    assert bool(((others >= 2.0) & (others < 3.0)).all())


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.pull(torch.tensor([1.0])), TypeError, "pull needs ids as a 1-D int64 tensor, got torch.float32"),
        (lambda s: s.pull(torch.tensor([[1]])), TypeError, "needs ids as a 1-D int64 tensor"),
        (lambda s: s.pull(torch.tensor([10**6])), IndexError, "are outside the table's 1000 rows"),
        (
            lambda s: s.pull(torch.from_numpy(s.sharding.rows_of(1)[:2])),
            ValueError,
            "Server 0 of table 'items' got rows it does not hold",
        ),
        (
            lambda s: s.apply(torch.from_numpy(s.sharding.rows_of(0)[[0, 0]]), torch.zeros(2, 4)),
            ValueError,
            "got repeated row ids",
        ),
        (
            lambda s: s.apply(torch.from_numpy(s.sharding.rows_of(0)[[3, 1, 2, 1]]), torch.zeros(4, 4)),
            ValueError,
            "got repeated row ids",
        ),
        (
            lambda s: s.apply(torch.from_numpy(s.sharding.rows_of(0)[:2]), torch.zeros(2, 3)),
            ValueError,
            "gradients must be float32 of shape [2, 4]",
        ),
        (
            lambda s: s.assign(torch.from_numpy(s.sharding.rows_of(0)[:2]), torch.zeros(3, 4)),
            ValueError,
            "assign() needs values of shape [2, 4]",
        ),
        (
            lambda s: s.load(torch.tensor([], dtype=torch.int64), torch.zeros(0, 4), {}, 0),
            ValueError,
            "the checkpoint has optimizer state []",
        ),
    ],
)
def test_store_errors_name_the_problem(call: Any, error: type[Exception], message: str) -> None:
    store = _hash_store()
    with pytest.raises(error, match=re.escape(message)):
        call(store)


def test_store_arguments_are_checked() -> None:
    table = TableSpec("t", 10, 2)
    with pytest.raises(ValueError, match=re.escape("has 10 rows but its sharding covers 11")):
        RowStore(table, RangeRowSharding(11, 1), 0, RowSGD())
    with pytest.raises(ValueError, match=re.escape("server=2 is not one of the 2 servers of table 't'")):
        RowStore(table, RangeRowSharding(10, 2), 2, RowSGD())
