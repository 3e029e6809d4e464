"""A worker's side of the sparse tables of one fit: pull a batch's unique rows, push their gradients, checkpoints.

Every exchange is a request the worker makes on the link it shares with the dense path, at points where the
dense path owes it nothing (the strategy settles the dense replies first), so replies arrive in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_patterns.exceptions import PeerFailedError
from lightning_patterns.strategies.parameter_server.link import Link, Pending
from lightning_patterns.strategies.parameter_server.messages import (
    Abort,
    Ack,
    Message,
    ProtocolError,
    decode_json,
    dtype_code,
    encode_json,
)
from lightning_patterns.strategies.parameter_server.sparse.checkpoint import TableCheckpoint, write_manifest
from lightning_patterns.strategies.parameter_server.sparse.gradients import RowGradientAccumulator, route_ids
from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowOptimizer
from lightning_patterns.strategies.parameter_server.sparse.protocol import (
    SparseInit,
    SparseLoad,
    SparsePull,
    SparsePush,
    SparseRows,
    SparseSave,
)
from lightning_patterns.strategies.parameter_server.sparse.sharding import RowSharding
from lightning_patterns.strategies.parameter_server.sparse.table import TableSpec

__all__ = ["SparseClient", "SparseTable", "SparseTelemetry"]

#: Rows per message when rank 0 assigns a module's initial rows or gathers a table back.
_CHUNK_ROWS = 1 << 18


@dataclass
class SparseTable:
    """One sparse table as a worker knows it: its description, sharding, optimizer and this step's gradients."""

    spec: TableSpec
    sharding: RowSharding
    optimizer: RowOptimizer
    lr: float
    gradients: RowGradientAccumulator = field(init=False)

    def __post_init__(self) -> None:
        self.gradients = RowGradientAccumulator(self.spec.dim, self.spec.torch_dtype)

    def to_json(self) -> dict[str, Any]:
        """What ``SPARSE_INIT`` tells the servers of this table."""
        return {
            "table": self.spec.to_json(),
            "sharding": self.sharding.to_json(),
            "optimizer": self.optimizer.to_json(),
        }


@dataclass
class SparseTelemetry:
    """Sparse counters of one worker: the last optimizer step's and the totals.

    Attributes:
        rows: unique rows pulled for training forwards in the last step, summed over tables (``ps/sparse_rows``).
        bytes: bytes of the last step's sparse pulls, their replies and pushes, headers included
            (``ps/sparse_bytes``).
        steps: steps recorded.
        history: ``(rows, bytes)`` of every step (kept for tests and benchmarks; 16 bytes a step).
        max_staleness_seen: the largest staleness the servers answered this worker's pulls with: steps of other
            workers' pushes the rows may have lacked (``0`` in sync mode).
    """

    rows: int = 0
    bytes: int = 0
    steps: int = 0
    max_staleness_seen: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)
    _rows: int = 0
    _bytes: int = 0

    def count(self, rows: int, nbytes: int) -> None:
        """Count a pull or push of the open step."""
        self._rows += rows
        self._bytes += nbytes

    def close_step(self) -> None:
        """The step's pushes are sent: its counters become the last step's."""
        self.rows, self.bytes = self._rows, self._bytes
        self.history.append((self.rows, self.bytes))
        self.steps += 1
        self._rows = self._bytes = 0

    def metrics(self, prefix: str = "ps/") -> dict[str, float]:
        """The counters as logger metrics."""
        return {f"{prefix}sparse_rows": float(self.rows), f"{prefix}sparse_bytes": float(self.bytes)}


class SparseClient:
    """Talks to the servers about the sparse tables, for one worker in one fit.

    Args:
        link: this worker's end of the worker-and-server group.
        tables: the fit's tables, in the order every worker lists them.
        world_size: workers of the job (servers are the global ranks after them).
        num_servers: servers of the job.
        timeout: seconds any wait may take.
        sync: the tables' rounds are synchronous (``None``: as the fit's dense part).
        max_staleness: asynchronous tables of a synchronous fit: how many steps of other workers' pushes a pull
            may lack (``None``: no bound).
    """

    def __init__(
        self,
        link: Link,
        tables: list[SparseTable],
        world_size: int,
        num_servers: int,
        timeout: float,
        sync: bool | None = None,
        max_staleness: int | None = None,
    ) -> None:
        self.link = link
        self.sync = sync
        self.max_staleness = max_staleness
        self.tables = tables
        self.world_size = world_size
        self.num_servers = num_servers
        self.timeout = timeout
        self.rank = link.rank
        self.telemetry = SparseTelemetry()
        self.steps = 0
        self.pull_seconds = 0.0

    def _server(self, server: int) -> int:
        return self.world_size + server

    def _expect(self, server: int, kind: type[Message]) -> tuple[Message, dict[str, torch.Tensor], int]:
        src = self._server(server)
        message, payloads, received = self.link.recv(src, timeout=self.timeout)
        if isinstance(message, Abort):
            reason = decode_json(payloads["json"], f"ABORT from rank {src}") if "json" in payloads else {}
            raise PeerFailedError(
                f"Worker rank {self.rank}: server rank {src} stopped the job: {reason.get('error', 'no reason given')}"
            )
        if not isinstance(message, kind):
            raise ProtocolError(
                f"Worker rank {self.rank} expected {kind.__name__} from rank {src}, got {type(message).__name__}."
            )
        return message, payloads, received

    # -- start -------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Rank 0 describes the tables to every server and waits for each."""
        if self.rank != 0:
            return
        description = encode_json([table.to_json() for table in self.tables])
        sync = -1 if self.sync is None else int(self.sync)
        header = SparseInit(description.numel(), sync, -1 if self.max_staleness is None else self.max_staleness)
        for server in range(self.num_servers):
            self.link.send(header, self._server(server), {"json": description})
        for server in range(self.num_servers):
            self._expect(server, Ack)

    def assign(self, index: int, values: torch.Tensor) -> None:
        """Rank 0: set every row of table ``index`` to ``values`` (a module built in full starts from its own)."""
        table = self.tables[index]
        code = dtype_code(table.spec.torch_dtype)
        acks = [0] * self.num_servers
        for start in range(0, values.shape[0], _CHUNK_ROWS):
            ids = torch.arange(start, min(start + _CHUNK_ROWS, values.shape[0]), dtype=torch.int64)
            for server, positions in enumerate(route_ids(ids, table.sharding)):
                if not positions.numel():
                    continue
                rows = values[ids[positions]].to(table.spec.torch_dtype).contiguous()
                header = SparsePush(index, 0, positions.numel(), table.spec.dim, code, assign=1)
                payloads = {"ids": ids[positions].contiguous(), "rows": rows.reshape(-1)}
                self.link.send(header, self._server(server), payloads)
                acks[server] += 1
        for server, count in enumerate(acks):
            for _ in range(count):
                self._expect(server, Ack)

    # -- pull and push -----------------------------------------------------------------------------------------------
    def pull(self, index: int, ids: torch.Tensor, count: bool = True, final: bool = False) -> torch.Tensor:
        """The current rows of the distinct ``ids`` of table ``index`` (``[len(ids), dim]``, host memory).

        ``final``: the end-of-fit gather, which in a hybrid fit waits for every worker's pushes.
        """
        start = time.perf_counter()
        table = self.tables[index]
        rows = torch.empty(ids.numel(), table.spec.dim, dtype=table.spec.torch_dtype)
        routes = [(server, positions) for server, positions in enumerate(route_ids(ids, table.sharding))]
        routes = [(server, positions) for server, positions in routes if positions.numel()]
        nbytes = 0
        for server, positions in routes:
            pending = self.link.post(
                SparsePull(index, positions.numel(), int(final)),
                self._server(server),
                {"ids": ids[positions].contiguous()},
            )
            nbytes += pending.nbytes
            pending.wait(self.timeout)
        for server, positions in routes:
            message, payloads, received = self._expect(server, SparseRows)
            assert isinstance(message, SparseRows)
            if message.table != index or message.num_ids != positions.numel() or message.dim != table.spec.dim:
                raise ProtocolError(
                    f"Server rank {self._server(server)} answered a pull of {positions.numel()} rows of table "
                    f"{index} with {message.num_ids} rows of table {message.table}."
                )
            rows[positions] = payloads["rows"].reshape(-1, table.spec.dim)
            nbytes += received
            self.telemetry.max_staleness_seen = max(self.telemetry.max_staleness_seen, message.staleness)
        if count:
            self.telemetry.count(ids.numel(), nbytes)
        self.pull_seconds += time.perf_counter() - start
        return rows

    def push(self) -> None:
        """End this worker's optimizer step: push every table's summed row gradients to every server (once each)."""
        pendings: list[Pending] = []
        nbytes = 0
        for index, table in enumerate(self.tables):
            ids, grads = table.gradients.drain()
            code = dtype_code(table.spec.torch_dtype)
            for server, positions in enumerate(route_ids(ids, table.sharding)):
                header = SparsePush(index, self.steps, positions.numel(), table.spec.dim, code, lr=table.lr)
                payloads = (
                    {"ids": ids[positions].contiguous(), "rows": grads[positions].contiguous().reshape(-1)}
                    if positions.numel()
                    else {}
                )
                pending = self.link.post(header, self._server(server), payloads)
                nbytes += pending.nbytes
                pendings.append(pending)
        for pending in pendings:
            pending.wait(self.timeout)
        self.steps += 1
        self.telemetry.count(0, nbytes)
        self.telemetry.close_step()

    # -- checkpoints and the end of a fit ----------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Rank 0: every server writes its rows under ``directory``; then the manifest ties them together."""
        request = encode_json({"directory": directory})
        for server in range(self.num_servers):
            self.link.send(SparseSave(request.numel()), self._server(server), {"json": request})
        shards: list[list[dict[str, Any]]] = [[] for _ in self.tables]
        steps = [0] * len(self.tables)
        for server in range(self.num_servers):
            _, payloads, _ = self._expect(server, SparseSave)
            for entry in decode_json(payloads["json"], f"SPARSE_SAVE from rank {self._server(server)}"):
                shards[int(entry["index"])].append(entry["shard"])
                steps[int(entry["index"])] = int(entry["step"])
        write_manifest(
            directory,
            [
                TableCheckpoint(index, table.spec, table.sharding, table.optimizer, steps[index], tuple(shards[index]))
                for index, table in enumerate(self.tables)
            ],
        )

    def load(self, directory: str) -> None:
        """Rank 0: every server replaces its rows by those of the checkpoint in ``directory`` (re-sharded)."""
        request = encode_json({"directory": directory})
        for server in range(self.num_servers):
            self.link.send(SparseLoad(request.numel()), self._server(server), {"json": request})
        for server in range(self.num_servers):
            self._expect(server, Ack)

    def gather(self, index: int) -> torch.Tensor:
        """Table ``index`` whole (``[num_rows, dim]``), pulled in chunks: for tables that fit one process."""
        spec = self.tables[index].spec
        table = torch.empty(spec.num_rows, spec.dim, dtype=spec.torch_dtype)
        for start in range(0, spec.num_rows, _CHUNK_ROWS):
            ids = torch.arange(start, min(start + _CHUNK_ROWS, spec.num_rows), dtype=torch.int64)
            table[start : start + ids.numel()] = self.pull(index, ids, count=False, final=True)
        return table
