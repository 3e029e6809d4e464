"""A server's side of the sparse tables of one fit: pulls, pushes, rounds, checkpoints.

A synchronous round of a table is complete when every worker pushed its gradient for that step (an empty push
counts): the server then sums the pushes per row in worker order, divides by the number of workers (each
worker's loss is the mean over its own batch, so the result is the gradient of the global batch, as in the dense
path) and applies the row optimizer once. A pull of worker ``w`` is answered only once every round ``w`` pushed
to is applied, so the next forward sees the step's update, as the dense path's parameters do; the rows of a held
pull that do not exist yet are created at once (:meth:`~.store.RowStore.prepare`), while the round waits for the
slowest worker, rather than after it. Asynchronous tables apply each push on arrival (divided by the number of
workers, as the dense async path does). In an asynchronous fit they answer pulls at once; the dense part's
``max_staleness`` bounds how far a worker runs ahead. In a synchronous fit whose tables are asynchronous (the
PERSIA hybrid, ``ParameterServerStrategy(sparse_mode="async")``) a pull of a worker that pushed ``t`` steps is
answered once every worker pushed at least ``t - max_staleness`` steps (held until then, like a sync pull), and
the end-of-fit gather and checkpoints wait for every worker's pushes up to the requesting worker's, so that they
hold every step.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_patterns.strategies.parameter_server.messages import (
    Ack,
    Message,
    ProtocolError,
    decode_json,
    dtype_code,
    encode_json,
)
from lightning_patterns.strategies.parameter_server.sparse.checkpoint import load_shard, save_shard
from lightning_patterns.strategies.parameter_server.sparse.gradients import RowGradientAccumulator
from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowOptimizer
from lightning_patterns.strategies.parameter_server.sparse.protocol import (
    SparseInit,
    SparseLoad,
    SparsePull,
    SparsePush,
    SparseRows,
    SparseSave,
)
from lightning_patterns.strategies.parameter_server.sparse.sharding import row_sharding_from_json
from lightning_patterns.strategies.parameter_server.sparse.store import RowStore
from lightning_patterns.strategies.parameter_server.sparse.table import TableSpec

__all__ = ["SPARSE_MESSAGES", "SparseServing"]

log = logging.getLogger(__name__)

#: The message types :meth:`SparseServing.handle` takes.
SPARSE_MESSAGES = (SparseInit, SparsePull, SparsePush, SparseSave, SparseLoad)
#: How the server sends: ``post(worker, header, payloads)``.
Post = Callable[[int, Message, dict[str, torch.Tensor]], None]


@dataclass
class _Table:
    store: RowStore
    pushes: list[deque[tuple[torch.Tensor, torch.Tensor, float]]]
    pushed: list[int]
    applied: int = 0
    pending: list[tuple[int, torch.Tensor, bool]] = field(default_factory=list)  # deferred pulls (worker, ids, final)


class SparseServing:
    """The sparse tables one server holds for one fit.

    Args:
        server: this server's index (``0 .. num_servers - 1``).
        num_workers: workers of the job.
        sync: whether the fit's (dense) rounds are synchronous; the tables' own mode comes with ``SPARSE_INIT``.
        post: sends a message to a worker (the server's own, which also counts the worker as answered).
    """

    def __init__(self, server: int, num_workers: int, sync: bool, post: Post) -> None:
        self.server = server
        self.num_workers = num_workers
        self.dense_sync = sync
        #: Whether the tables' rounds are synchronous (``SPARSE_INIT`` may make them async in a sync fit).
        self.sync = sync
        #: Asynchronous tables of a synchronous fit: how many steps of other workers' pushes a pull may lack.
        self.max_staleness: int | None = None
        self.post = post
        self.tables: list[_Table] = []
        self._saves: list[tuple[int, str]] = []  # deferred saves (worker, directory)

    # -- dispatch ----------------------------------------------------------------------------------------------------
    def handle(self, worker: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        """Handle one sparse message of ``worker``; :class:`ProtocolError` for one that breaks the protocol."""
        if isinstance(message, SparseInit):
            self._init(worker, message, payloads)
            return
        if not self.tables:
            raise ProtocolError(f"Rank {worker} sent {message.kind.name} before SPARSE_INIT.")
        if isinstance(message, SparsePull):
            table = self._table(worker, message.table)
            ids = payloads.get("ids", torch.empty(0, dtype=torch.int64))
            final = bool(message.final)
            if self._caught_up(table, worker, final):
                self._answer(worker, message.table, ids)
            else:
                if ids.numel():
                    table.store.prepare(ids)
                table.pending.append((worker, ids, final))
        elif isinstance(message, SparsePush):
            self._push(worker, message, payloads)
        elif isinstance(message, SparseSave):
            if worker != 0:
                raise ProtocolError(f"Rank {worker} sent SPARSE_SAVE; only worker rank 0 saves.")
            self._saves.append((worker, self._directory(worker, payloads, "SPARSE_SAVE")))
            self._serve_saves()
        elif isinstance(message, SparseLoad):
            if worker != 0:
                raise ProtocolError(f"Rank {worker} sent SPARSE_LOAD; only worker rank 0 loads.")
            self._load(self._directory(worker, payloads, "SPARSE_LOAD"))
            self.post(worker, Ack(), {})

    def _table(self, worker: int, index: int) -> _Table:
        if not 0 <= index < len(self.tables):
            raise ProtocolError(f"Rank {worker} named sparse table {index}; the fit has {len(self.tables)}.")
        return self.tables[index]

    @staticmethod
    def _directory(worker: int, payloads: dict[str, torch.Tensor], what: str) -> str:
        described = decode_json(payloads.get("json", torch.empty(0, dtype=torch.uint8)), f"{what} from rank {worker}")
        if not isinstance(described, dict) or not isinstance(described.get("directory"), str):
            raise ProtocolError(f"{what} from rank {worker} names no directory.")
        return str(described["directory"])

    # -- the fit's tables --------------------------------------------------------------------------------------------
    def _init(self, worker: int, message: SparseInit, payloads: dict[str, torch.Tensor]) -> None:
        if worker != 0 or self.tables:
            raise ProtocolError(f"Rank {worker} sent SPARSE_INIT, which only rank 0 sends, once per fit.")
        if message.sync == 1 and not self.dense_sync:
            raise ProtocolError(
                "SPARSE_INIT asks for synchronous tables in an asynchronous fit, which is not supported."
            )
        if message.sync == 0:
            self.sync = False
        self.max_staleness = None if message.max_staleness < 0 else message.max_staleness
        described = decode_json(payloads.get("json", torch.empty(0, dtype=torch.uint8)), "SPARSE_INIT")
        try:
            for entry in described:
                store = RowStore(
                    TableSpec.from_json(entry["table"]),
                    row_sharding_from_json(entry["sharding"]),
                    self.server,
                    RowOptimizer.from_json(entry["optimizer"]),
                )
                pushes: list[deque[tuple[torch.Tensor, torch.Tensor, float]]] = [
                    deque() for _ in range(self.num_workers)
                ]
                self.tables.append(_Table(store, pushes, [0] * self.num_workers))
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"SPARSE_INIT describes invalid tables ({error}).") from None
        log.info(
            "serving %d sparse tables (%s): %s",
            len(self.tables),
            "sync" if self.sync else f"async, max_staleness={self.max_staleness}",
            ", ".join(f"{t.store.table.name} ({type(t.store.optimizer).__name__})" for t in self.tables),
        )
        self.post(worker, Ack(), {})

    # -- pulls -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _staleness(table: _Table, worker: int) -> int:
        """Steps of other workers' pushes that rows read now may lack, for ``worker``'s next step."""
        return max(0, table.pushed[worker] - min(table.pushed))

    def _caught_up(self, table: _Table, worker: int, final: bool = False) -> bool:
        """Whether a pull (``final``: the end-of-fit gather, or a checkpoint) of ``worker`` may be answered now."""
        if self.sync:
            return table.applied >= table.pushed[worker]
        if not self.dense_sync:
            return True  # an async fit: the dense part's `max_staleness` bounds the workers
        # The hybrid: every worker runs every step (the dense rounds are synchronous), so waiting for the pushes
        # of `bound` steps ago always ends; async pushes are applied as they arrive, so pushed is applied.
        bound = 0 if final else self.max_staleness
        return bound is None or self._staleness(table, worker) <= bound

    def _answer(self, worker: int, index: int, ids: torch.Tensor) -> None:
        table = self.tables[index]
        store = table.store
        rows = store.pull(ids) if ids.numel() else torch.empty(0, store.table.dim, dtype=store.table.torch_dtype)
        staleness = self._staleness(table, worker)
        header = SparseRows(index, ids.numel(), store.table.dim, dtype_code(rows.dtype), staleness)
        self.post(worker, header, {"rows": rows.reshape(-1)} if rows.numel() else {})

    # -- pushes ------------------------------------------------------------------------------------------------------
    def _push(self, worker: int, message: SparsePush, payloads: dict[str, torch.Tensor]) -> None:
        table = self._table(worker, message.table)
        spec = table.store.table
        ids = payloads.get("ids", torch.empty(0, dtype=torch.int64))
        rows = payloads.get("rows", torch.empty(0, dtype=spec.torch_dtype))
        if message.num_ids and (message.dim != spec.dim or rows.dtype != spec.torch_dtype):
            raise ProtocolError(
                f"Rank {worker} pushed rows of {message.dim} {rows.dtype} to table {spec.name!r} of {spec.dim} "
                f"{spec.torch_dtype}."
            )
        rows = rows.reshape(message.num_ids, spec.dim)
        if message.assign:
            if worker != 0:
                raise ProtocolError(f"Rank {worker} assigned rows; only worker rank 0 does.")
            table.store.assign(ids, rows)
            self.post(worker, Ack(), {})
            return
        table.pushed[worker] += 1
        if self.sync:
            table.pushes[worker].append((ids, rows, message.lr))
            while all(table.pushes):
                self._apply_round(table)
        else:
            table.store.optimizer = self._with_lr(table.store.optimizer, message.lr)
            table.store.apply(ids, rows / self.num_workers)
            table.applied += 1
        if table.pending:
            pending, table.pending = table.pending, []
            for waiting, pulled, final in pending:
                if self._caught_up(table, waiting, final):
                    self._answer(waiting, self.tables.index(table), pulled)
                else:
                    table.pending.append((waiting, pulled, final))
        self._serve_saves()

    def _apply_round(self, table: _Table) -> None:
        spec = table.store.table
        accumulator = RowGradientAccumulator(spec.dim, spec.torch_dtype)
        lr = 0.0
        for worker in range(self.num_workers):
            ids, rows, lr_of_worker = table.pushes[worker].popleft()
            if worker == 0:
                lr = lr_of_worker
            if ids.numel():
                accumulator.add(ids, rows)
        ids, grads = accumulator.drain(divide_by=self.num_workers)
        table.store.optimizer = self._with_lr(table.store.optimizer, lr)
        table.store.apply(ids, grads)
        table.applied += 1

    @staticmethod
    def _with_lr(optimizer: RowOptimizer, lr: float) -> RowOptimizer:
        current = getattr(optimizer, "lr", None)
        return optimizer if current is None or current == lr else optimizer.with_hyperparameters({"lr": lr})

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _serve_saves(self) -> None:
        """Write the shards once every round rank 0 pushed before its save is applied."""
        while self._saves and all(self._caught_up(table, self._saves[0][0], final=True) for table in self.tables):
            worker, directory = self._saves.pop(0)
            entries = [
                {"index": index, "step": table.store.step, "shard": save_shard(directory, index, table.store)}
                for index, table in enumerate(self.tables)
            ]
            reply = encode_json(entries)
            self.post(worker, SparseSave(reply.numel()), {"json": reply})

    def _load(self, directory: str) -> None:
        for table in self.tables:
            store = table.store
            (ids, values, state), step = load_shard(directory, store.table.name, store.sharding, self.server)
            store.load(ids, values, state, step)
        log.info("loaded the sparse tables of %s", directory)
