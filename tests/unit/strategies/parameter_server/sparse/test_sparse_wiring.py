"""How the strategy chooses sparse embeddings, builds them on the meta device, and how a server runs their rounds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_patterns.strategies.parameter_server.messages import Ack, Message, ProtocolError, encode_json
from lightning_patterns.strategies.parameter_server.sparse.client import SparseTable
from lightning_patterns.strategies.parameter_server.sparse.embeddings import (
    SparseEmbeddings,
    choose_sparse_modules,
    materialize,
    meta_embeddings,
)
from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowAdagrad, RowSGD
from lightning_patterns.strategies.parameter_server.sparse.protocol import (
    SparseInit,
    SparsePull,
    SparsePush,
    SparseRows,
    SparseSave,
)
from lightning_patterns.strategies.parameter_server.sparse.serving import SparseServing
from lightning_patterns.strategies.parameter_server.sparse.sharding import RangeRowSharding
from lightning_patterns.strategies.parameter_server.sparse.table import RowInitializer, TableSpec


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Embedding(10, 2)
        self.large = nn.EmbeddingBag(1000, 2)
        self.head = nn.Linear(2, 1)


def test_embeddings_are_chosen_by_name_or_by_rows() -> None:
    net = _Net()
    assert list(choose_sparse_modules(net, None, 100)) == ["large"]
    assert list(choose_sparse_modules(net, None, 5)) == ["small", "large"]
    assert choose_sparse_modules(net, None, None) == {}
    assert list(choose_sparse_modules(net, ["small"], 100)) == ["small"]


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["missing"], r"_Net has no submodule 'missing'. Its embeddings are \['small', 'large'\]"),
        (["head"], r"names a Linear; only nn.Embedding and nn.EmbeddingBag"),
    ],
)
def test_wrong_sparse_modules_name_the_fix(names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_sparse_modules(_Net(), names, None)


def test_an_embedding_with_max_norm_is_refused() -> None:
    net = _Net()
    net.large = nn.EmbeddingBag(1000, 2, max_norm=1.0)
    with pytest.raises(ValueError, match=r"'large' has max_norm=1.0, which renormalises rows on lookup"):
        choose_sparse_modules(net, None, 100)


def test_meta_context_records_the_modules_init_and_materialises_on_request() -> None:
    recorded: dict[int, RowInitializer] = {}
    with meta_embeddings(100, recorded):
        large = nn.Embedding(1000, 4, padding_idx=3)
        small = nn.Embedding(10, 4)
        bag = nn.EmbeddingBag(500, 4)
        nn.init.normal_(large.weight, std=0.01)
        nn.init.uniform_(bag.weight, -0.1, 0.2)
    assert large.weight.is_meta
    assert bag.weight.is_meta
    assert not small.weight.is_meta
    assert recorded[id(large.weight)] == RowInitializer("normal", std=0.01)
    assert recorded[id(bag.weight)] == RowInitializer("uniform", low=-0.1, high=0.2)
    assert not nn.Embedding(1000, 2).weight.is_meta  # the context is gone
    materialize(large, recorded[id(large.weight)])
    assert not large.weight.is_meta
    assert float(large.weight.detach()[3].abs().sum()) == 0.0
    assert 0.005 < float(large.weight.detach().std()) < 0.015


def test_tables_leave_the_optimizer_and_name_their_row_optimizer() -> None:
    net = _Net()
    embeddings = SparseEmbeddings({"large": net.large}, {}, num_servers=2, keep_values=True)
    assert "weight" not in dict(net.large.named_parameters())
    with embeddings.weights_for_optimizer():
        groups = [{"params": [net.large.weight], "lr": 0.3}, {"params": list(net.head.parameters())}]
        optimizer = torch.optim.Adagrad(groups, lr=0.1)
    embeddings.take_from_optimizer(optimizer)
    assert optimizer.param_groups[0]["params"] == []
    assert embeddings.tables[0].optimizer == RowAdagrad(lr=0.3)
    assert embeddings.tables[0].spec.num_rows == 1000
    assert embeddings.initial["large"] is not None


def test_a_table_in_no_param_group_is_refused() -> None:
    net = _Net()
    embeddings = SparseEmbeddings({"large": net.large}, {}, num_servers=1, keep_values=False)
    with embeddings.weights_for_optimizer():
        optimizer = torch.optim.SGD(net.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"no param group of `configure_optimizers` holds its weight"):
        embeddings.take_from_optimizer(optimizer)


class _Outbox:
    """What a server sends, per worker (the server's own `post` is a send on the link)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Message, dict[str, torch.Tensor]]] = []

    def __call__(self, worker: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        self.sent.append((worker, message, payloads))


def _serving(sync: bool = True, sparse_sync: int = -1, max_staleness: int = -1) -> tuple[SparseServing, _Outbox]:
    outbox = _Outbox()
    serving = SparseServing(server=0, num_workers=2, sync=sync, post=outbox)
    table = SparseTable(
        TableSpec("t", 6, 2, initializer=RowInitializer("zeros")), RangeRowSharding(6, 1), RowSGD(1.0), 1.0
    )
    description = encode_json([table.to_json()])
    serving.handle(0, SparseInit(description.numel(), sparse_sync, max_staleness), {"json": description})
    assert isinstance(outbox.sent.pop()[1], Ack)
    return serving, outbox


def _push(serving: SparseServing, worker: int, ids: list[int], value: float, lr: float = 1.0) -> None:
    grads = torch.full((len(ids), 2), value)
    payloads = {"ids": torch.tensor(ids), "rows": grads.reshape(-1)} if ids else {}
    serving.handle(worker, SparsePush(0, 0, len(ids), 2, 1, lr=lr), payloads)


def test_a_sync_round_averages_the_workers_pushes_and_holds_pulls_until_applied() -> None:
    serving, outbox = _serving()
    _push(serving, 0, [1, 2], 2.0)
    serving.handle(0, SparsePull(0, 2), {"ids": torch.tensor([1, 5])})
    assert outbox.sent == []  # worker 0's step is not applied yet: its pull waits
    # ... but its rows not created yet are created now, off the critical path (row 1 is updated when applied).
    assert serving.tables[0].store.num_created == 2
    _push(serving, 1, [2], 4.0)
    worker, message, payloads = outbox.sent.pop()
    assert worker == 0
    assert isinstance(message, SparseRows)
    # Row 1: -(2 + 0) / 2; row 5: never pushed, its initial zeros.
    assert payloads["rows"].reshape(2, 2).tolist() == [[-1.0, -1.0], [0.0, 0.0]]
    serving.handle(1, SparsePull(0, 1), {"ids": torch.tensor([2])})
    assert outbox.sent.pop()[2]["rows"].tolist() == [-3.0, -3.0]  # -(2 + 4) / 2


def _rows(outbox: _Outbox, worker: int) -> tuple[int, list[float]]:
    sent, message, payloads = outbox.sent.pop()
    assert sent == worker
    assert isinstance(message, SparseRows)
    return message.staleness, payloads["rows"].reshape(-1, 2)[:, 0].tolist()


def test_hybrid_tables_apply_pushes_on_arrival_and_hold_pulls_beyond_the_staleness_bound() -> None:
    """A sync fit with async tables, bound 1: a pull at step t waits only for the pushes of steps before t - 1."""
    serving, outbox = _serving(sync=True, sparse_sync=0, max_staleness=1)
    assert (serving.sync, serving.max_staleness) == (False, 1)
    _push(serving, 0, [1], 2.0)  # worker 0, step 0: applied at once, at 1/W
    serving.handle(0, SparsePull(0, 1), {"ids": torch.tensor([1])})  # step 1: lacks worker 1's step 0, allowed
    assert _rows(outbox, 0) == (1, [-1.0])
    _push(serving, 0, [2], 2.0)  # worker 0, step 1
    serving.handle(0, SparsePull(0, 2), {"ids": torch.tensor([1, 2])})  # step 2 would lack worker 1's step 0
    assert outbox.sent == []
    _push(serving, 1, [1], 4.0)  # worker 1, step 0: the held pull is answered, with it
    assert _rows(outbox, 0) == (1, [-3.0, -1.0])
    # The end-of-fit gather (and a checkpoint) waits for every worker's pushes up to the puller's.
    serving.handle(0, SparsePull(0, 1, final=1), {"ids": torch.tensor([2])})
    assert outbox.sent == []
    _push(serving, 1, [2], 2.0)
    assert _rows(outbox, 0) == (0, [-2.0])
    # A slower worker's pulls are never held: nothing it lacks is older than its own step.
    serving.handle(1, SparsePull(0, 1), {"ids": torch.tensor([1])})
    assert _rows(outbox, 1) == (0, [-3.0])


def test_sync_tables_in_an_async_fit_are_refused_by_the_server() -> None:
    with pytest.raises(ProtocolError, match="synchronous tables in an asynchronous fit"):
        _serving(sync=False, sparse_sync=1)


def test_the_learning_rate_of_each_step_travels_with_the_push() -> None:
    serving, outbox = _serving(sync=False)
    _push(serving, 0, [0], 1.0, lr=0.5)
    serving.handle(0, SparsePull(0, 1), {"ids": torch.tensor([0])})
    assert outbox.sent.pop()[2]["rows"].tolist() == [-0.25, -0.25]  # async: applied at once, 1/W of it


def test_sparse_messages_before_init_or_from_the_wrong_rank_are_refused() -> None:
    serving = SparseServing(server=0, num_workers=2, sync=True, post=_Outbox())
    with pytest.raises(ProtocolError, match="SPARSE_PULL before SPARSE_INIT"):
        serving.handle(1, SparsePull(0, 0), {})
    serving, _ = _serving()
    request: Any = encode_json({"directory": "x"})
    with pytest.raises(ProtocolError, match="only worker rank 0 saves"):
        serving.handle(1, SparseSave(request.numel()), {"json": request})
