"""The sparse messages of the parameter-server protocol: headers of :mod:`~..messages`, raw tensor payloads.

They travel on the same link as the dense messages (gloo point-to-point, headers first), with payloads named
``ids`` and ``rows``, which no shared region is attached for, so they always go over the group from host
buffers. Sizes come from the header alone, as for every message::

    SPARSE_INIT (rank 0 → server)  JSON: the tables, their shardings and row optimizers; header: how the
                                   tables' rounds run (``sync``, ``max_staleness``)          → ACK
    SPARSE_PULL (worker → server)  ids int64[num_ids] of table ``table``; ``final=1``: the end-of-fit gather
                                   (waits for every worker's pushes in a hybrid fit)         → SPARSE_ROWS
    SPARSE_ROWS (server → worker)  rows dtype[num_ids × dim], in the order of the pull's ids; header: the
                                   staleness the rows were answered with
    SPARSE_PUSH (worker → server)  ids int64[num_ids], gradients dtype[num_ids × dim]; ``assign=1``: values
                                   to set (rank 0's initial rows of a module built in full), acknowledged
    SPARSE_SAVE (rank 0 → server)  JSON ``{"directory": ...}``: write this server's shards → SPARSE_SAVE
                                   back, its JSON the manifest entries of the shards written
    SPARSE_LOAD (rank 0 → server)  JSON ``{"directory": ...}``: load (re-shard) the rows      → ACK

A push is one worker's gradient of one table for one optimizer step, summed over its micro-batches: every worker
sends one to every server for every table at every step (``num_ids=0`` when it has none for that server), so a
server knows when a synchronous round of a table is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_patterns.strategies.parameter_server.messages import (
    DTYPES,
    Kind,
    Message,
    PayloadSpec,
    ProtocolError,
)

__all__ = [
    "SparseInit",
    "SparseLoad",
    "SparsePull",
    "SparsePush",
    "SparseRows",
    "SparseSave",
]


def _row_dtype(code: int, what: str) -> torch.dtype:
    dtype = DTYPES.get(code)
    if dtype is None or not dtype.is_floating_point:
        raise ProtocolError(f"{what}: dtype code {code} is not a floating dtype of {sorted(DTYPES)}.")
    return dtype


@dataclass(frozen=True)
class _Described(Message):
    json_bytes: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The JSON."""
        return [PayloadSpec("json", self.json_bytes, torch.uint8)] if self.json_bytes else []


@dataclass(frozen=True)
class SparseInit(_Described):
    """Rank 0: the fit's sparse tables (JSON list of table, sharding and optimizer descriptions).

    Attributes:
        sync: ``1``: synchronous rounds (a pull waits for the step's update); ``0``: each push applied on arrival;
            ``-1``: as the fit's dense part.
        max_staleness: asynchronous tables of a synchronous fit (the hybrid): a pull of a worker that pushed ``t``
            steps is answered once every worker pushed at least ``t - max_staleness`` (``-1``: no bound).
    """

    kind: ClassVar[Kind] = Kind.SPARSE_INIT
    sync: int = -1
    max_staleness: int = -1


@dataclass(frozen=True)
class SparseSave(_Described):
    """Rank 0: write this server's rows of every table under ``{"directory": ...}`` (answered with the entries)."""

    kind: ClassVar[Kind] = Kind.SPARSE_SAVE


@dataclass(frozen=True)
class SparseLoad(_Described):
    """Rank 0: replace every table's rows by those of the checkpoint in ``{"directory": ...}``."""

    kind: ClassVar[Kind] = Kind.SPARSE_LOAD


@dataclass(frozen=True)
class SparsePull(Message):
    """The current values of rows ``ids`` of table ``table``, please (``final=1``: the end-of-fit gather)."""

    kind: ClassVar[Kind] = Kind.SPARSE_PULL
    table: int = 0
    num_ids: int = 0
    final: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The ids."""
        return [PayloadSpec("ids", self.num_ids, torch.int64)] if self.num_ids else []


@dataclass(frozen=True)
class SparseRows(Message):
    """A server's answer to a :class:`SparsePull`: ``num_ids`` rows of ``dim`` values.

    ``staleness``: the pulling worker's pushes minus the fewest any worker had pushed when the rows were read (the
    steps whose pushes the rows may lack; ``0`` in sync mode).
    """

    kind: ClassVar[Kind] = Kind.SPARSE_ROWS
    table: int = 0
    num_ids: int = 0
    dim: int = 0
    dtype: int = 0
    staleness: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The rows."""
        numel = self.num_ids * self.dim
        return [PayloadSpec("rows", numel, _row_dtype(self.dtype, "SPARSE_ROWS"))] if numel else []


@dataclass(frozen=True)
class SparsePush(Message):
    """One worker's summed gradient (or, with ``assign=1``, initial values) of rows ``ids`` of table ``table``.

    Attributes:
        table: the table's index in the fit.
        step: the worker's optimizer steps before this one.
        num_ids: rows (distinct ids).
        dim: values per row.
        dtype: wire code of the rows' dtype.
        assign: ``1``: the rows are values to set, not gradients (answered with ``ACK``).
        lr: the learning rate of the table's param group at this step (schedulers change it).
    """

    kind: ClassVar[Kind] = Kind.SPARSE_PUSH
    table: int = 0
    step: int = 0
    num_ids: int = 0
    dim: int = 0
    dtype: int = 0
    assign: int = 0
    lr: float = 0.0

    def payloads(self) -> list[PayloadSpec]:
        """The ids, then the rows."""
        if not self.num_ids:
            return []
        rows = PayloadSpec("rows", self.num_ids * self.dim, _row_dtype(self.dtype, "SPARSE_PUSH"))
        return [PayloadSpec("ids", self.num_ids, torch.int64), rows]
