"""Row-wise optimizers against torch: SGD and Adagrad equal dense training, lazy Adam equals SparseAdam."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server.sparse import (
    RangeRowSharding,
    RowAdagrad,
    RowAdam,
    RowOptimizer,
    RowSGD,
    RowStore,
    TableSpec,
    row_optimizer_from_torch,
)

NUM_ROWS, DIM, STEPS = 40, 5, 12


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: distinct touched rows (a few, some repeated across steps, some never) and their gradients."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        # Rows 30.. are never touched: optimizers must leave them exactly as they were.
        ids = torch.randperm(30, generator=generator)[: int(torch.randint(1, 12, (1,), generator=generator))]
        batches.append((ids.sort().values, torch.randn(len(ids), DIM, generator=generator)))
    return batches


def _store(optimizer: RowOptimizer, initial: torch.Tensor) -> RowStore:
    store = RowStore(TableSpec("t", NUM_ROWS, DIM), RangeRowSharding(NUM_ROWS, 1), 0, optimizer)
    store.assign(torch.arange(NUM_ROWS), initial)
    return store


def _run_store(optimizer: RowOptimizer, initial: torch.Tensor, batches: list[Any]) -> torch.Tensor:
    store = _store(optimizer, initial)
    for ids, grads in batches:
        store.apply(ids, grads)
    return store.pull(torch.arange(NUM_ROWS))


def _run_dense(
    optimizer_cls: type[torch.optim.Optimizer], initial: torch.Tensor, batches: list[Any], **kwargs: Any
) -> torch.Tensor:
    weight = torch.nn.Parameter(initial.clone())
    optimizer = optimizer_cls([weight], **kwargs)
    for ids, grads in batches:
        dense = torch.zeros_like(weight)
        dense[ids] = grads
        weight.grad = dense
        optimizer.step()
    return weight.detach()


@pytest.mark.parametrize(
    ("row_optimizer", "torch_cls", "kwargs"),
    [
        (RowSGD(lr=0.1), torch.optim.SGD, {"lr": 0.1}),
        (RowAdagrad(lr=0.3), torch.optim.Adagrad, {"lr": 0.3}),
        (
            RowAdagrad(lr=0.3, lr_decay=0.05, eps=1e-6, initial_accumulator_value=0.1),
            torch.optim.Adagrad,
            {"lr": 0.3, "lr_decay": 0.05, "eps": 1e-6, "initial_accumulator_value": 0.1},
        ),
    ],
)
def test_exact_optimizers_equal_dense_training(row_optimizer: RowOptimizer, torch_cls: Any, kwargs: Any) -> None:
    initial = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(1))
    batches = _batches()
    rows = _run_store(row_optimizer, initial, batches)
    dense = _run_dense(torch_cls, initial, batches, **kwargs)
    assert not torch.equal(rows[:30], initial[:30])  # it trained
    torch.testing.assert_close(rows, dense, rtol=0, atol=1e-6)
    assert torch.equal(rows[30:], initial[30:])


def _run_sparse_adam(
    initial: torch.Tensor, batches: list[Any], weight_decay: float = 0.0, decoupled: bool = False
) -> torch.Tensor:
    """torch.optim.SparseAdam, with weight decay of the touched rows added the way Adam / AdamW apply it."""
    weight = torch.nn.Parameter(initial.clone())
    optimizer = torch.optim.SparseAdam([weight], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for ids, grads in batches:
        if decoupled:
            with torch.no_grad():
                weight[ids] *= 1 - 0.05 * weight_decay
        elif weight_decay:
            grads = grads.add(weight.detach()[ids], alpha=weight_decay)  # as torch.optim.Adam adds it
        weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grads, weight.shape)
        optimizer.step()
    return weight.detach()


@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.1, False), (0.1, True)])
def test_lazy_adam_equals_sparse_adam(weight_decay: float, decoupled: bool) -> None:
    initial = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(2))
    batches = _batches(seed=3)
    optimizer = RowAdam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, decoupled=decoupled)
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        reference = _run_sparse_adam(initial, batches, weight_decay, decoupled)
    rows = _run_store(optimizer, initial, batches)
    assert not torch.equal(rows[:30], initial[:30])
    torch.testing.assert_close(rows, reference, rtol=0, atol=1e-6)
    assert torch.equal(rows[30:], initial[30:])


def test_lazy_adam_differs_from_dense_adam_on_untouched_steps() -> None:
    """The documented difference: dense Adam keeps moving a row its gradient no longer touches."""
    initial = torch.zeros(NUM_ROWS, DIM)
    batches = [(torch.tensor([0]), torch.ones(1, DIM)), (torch.tensor([1]), torch.ones(1, DIM))]
    lazy = _run_store(RowAdam(lr=0.1), initial, batches)
    dense = _run_dense(torch.optim.Adam, initial, batches, lr=0.1)
    # Row 1's moments were zero until step 2 in both (zeros decay to zeros), so its one update agrees.
    torch.testing.assert_close(dense[1], lazy[1], rtol=0, atol=1e-6)
    assert dense[0, 0] < lazy[0, 0]  # row 0: dense Adam moved it again on step 2 with its momentum


@pytest.mark.parametrize(
    ("cls", "group", "expected"),
    [
        (torch.optim.SGD, {"lr": 0.5, "momentum": 0, "weight_decay": 0}, RowSGD(lr=0.5)),
        (torch.optim.Adagrad, {"lr": 0.2, "lr_decay": 0.1, "eps": 1e-8, "weight_decay": 0}, RowAdagrad(0.2, 0.1, 1e-8)),
        (
            torch.optim.Adam,
            {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.01},
            RowAdam(0.1, (0.8, 0.9), 1e-7, 0.01),
        ),
        (
            torch.optim.AdamW,
            {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.01},
            RowAdam(0.1, (0.8, 0.9), 1e-7, 0.01, True),
        ),
        (torch.optim.SparseAdam, {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-7}, RowAdam(0.1, (0.8, 0.9), 1e-7)),
    ],
)
def test_row_optimizer_from_torch_param_groups(cls: Any, group: dict[str, Any], expected: RowOptimizer) -> None:
    parameter = torch.nn.Parameter(torch.zeros(2))
    built = cls([parameter], **group)
    assert row_optimizer_from_torch(cls, built.param_groups[0]) == expected


@pytest.mark.parametrize(
    ("cls", "group", "message"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum would keep moving untouched rows; use momentum=0"),
        (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}, "SGD(weight_decay=0.1)"),
        (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}, "Adagrad(weight_decay=0.1)"),
        (torch.optim.Adam, {"lr": 0.1, "amsgrad": True}, "use amsgrad=False"),
        (torch.optim.Adam, {"lr": 0.1, "maximize": True}, "negate the loss instead"),
        (torch.optim.RMSprop, {"lr": 0.1}, "no row-wise version of RMSprop"),
    ],
)
def test_row_optimizer_from_torch_refuses_what_would_differ(cls: Any, group: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"Sparse tables support|configure_optimizers") as error:
        row_optimizer_from_torch(cls, group)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "optimizer", [RowSGD(0.3), RowAdagrad(0.1, 0.01, 1e-9, 0.2), RowAdam(0.1, (0.5, 0.6), 1e-3, 0.1, True)]
)
def test_json_round_trip(optimizer: RowOptimizer) -> None:
    assert RowOptimizer.from_json(optimizer.to_json()) == optimizer
    assert optimizer.with_hyperparameters({"lr": 7.0}).lr == 7.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RowSGD(lr=-1.0), "RowSGD needs lr >= 0"),
        (lambda: RowAdagrad(eps=-1.0), "RowAdagrad needs lr_decay, eps and initial_accumulator_value >= 0"),
        (lambda: RowAdam(betas=(1.0, 0.9)), "RowAdam needs betas in [0, 1)"),
        (lambda: RowAdam(weight_decay=-0.1), "RowAdam needs eps and weight_decay >= 0"),
        (lambda: RowOptimizer.from_json({"name": "lion", "hyperparameters": {}}), "Unknown row-wise optimizer 'lion'"),
    ],
)
def test_invalid_arguments(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
