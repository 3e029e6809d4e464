"""The sparse wire format: pull (ids → rows) and push (ids + row gradients) as raw tensors, never pickle.

A message is a header, an ``int64`` tensor of :data:`HEADER_FIELDS` values, followed by its payloads, each a
flat tensor whose element count and dtype the header alone gives (:func:`payload_specs`), so a receiver
allocates each buffer before receiving it, whatever transport carries them::

    header  = [MAGIC, VERSION, kind, table, num_ids, dim, dtype code, step]
    PULL    (worker → server): ids int64[num_ids]
    ROWS    (server → worker): rows dtype[num_ids × dim]          (in the order of the pull's ids)
    PUSH    (worker → server): ids int64[num_ids], grads dtype[num_ids × dim]

``table`` is the table's index in the fit's list of sparse tables, ``step`` the pushing worker's step (0 in
pulls and rows). dtype codes are those of :data:`~..messages.DTYPES`. Decoding checks every field and size and
raises :class:`~..messages.ProtocolError` naming the sender; it never runs code.

Bytes per step and worker, for ``n`` unique rows of width ``d`` and item size ``b`` (one pull, its reply and one
push per server touched): ``8 n`` (pulled ids) ``+ n d b`` (rows) ``+ 8 n + n d b`` (pushed ids and gradients),
plus three headers per server (:func:`step_bytes`): the ``ps/sparse_bytes`` theory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from lightning_patterns.strategies.parameter_server.messages import DTYPES, ProtocolError, dtype_code

__all__ = [
    "HEADER_FIELDS",
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "RowPull",
    "RowPush",
    "RowValues",
    "SparseKind",
    "SparseMessage",
    "decode",
    "encode",
    "message_nbytes",
    "payload_specs",
    "step_bytes",
]

HEADER_FIELDS = 8
MAGIC = 0x53505253  # "SPRS"
_VERSION = 1
#: The most bytes one payload may announce (a pull of a batch's unique rows is far smaller).
MAX_PAYLOAD_BYTES = 4 * 2**30
_HEADER_BYTES = HEADER_FIELDS * 8


class SparseKind(enum.IntEnum):
    """What a sparse message is."""

    PULL = 1
    ROWS = 2
    PUSH = 3


@dataclass(frozen=True)
class RowPull:
    """A worker asks a server for the current values of rows ``ids`` of table ``table``."""

    table: int
    ids: torch.Tensor


@dataclass(frozen=True)
class RowValues:
    """A server's reply to a :class:`RowPull`: ``rows[i]`` is the value of the pull's ``ids[i]``."""

    table: int
    rows: torch.Tensor


@dataclass(frozen=True)
class RowPush:
    """A worker's gradient of rows ``ids`` (distinct) of table ``table``, computed at its step ``step``."""

    table: int
    ids: torch.Tensor
    grads: torch.Tensor
    step: int = 0


SparseMessage = RowPull | RowValues | RowPush


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1)


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"Row ids travel as a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}.")


def _check_rows(rows: torch.Tensor, what: str) -> tuple[int, int]:
    if rows.dim() != 2 or not rows.dtype.is_floating_point:
        raise ValueError(
            f"{what} travel as a 2-D floating tensor [rows, dim], got {rows.dtype} of shape {tuple(rows.shape)}."
        )
    return rows.shape[0], rows.shape[1]


def encode(message: SparseMessage) -> list[torch.Tensor]:
    """``[header, *payloads]``: flat, contiguous CPU tensors to send in this order."""
    if isinstance(message, RowPull):
        _check_ids(message.ids)
        header = [SparseKind.PULL, message.table, message.ids.numel(), 0, 0, 0]
        payloads = [_flat(message.ids)]
    elif isinstance(message, RowValues):
        num_rows, dim = _check_rows(message.rows, "Rows")
        header = [SparseKind.ROWS, message.table, num_rows, dim, dtype_code(message.rows.dtype), 0]
        payloads = [_flat(message.rows)]
    elif isinstance(message, RowPush):
        _check_ids(message.ids)
        num_rows, dim = _check_rows(message.grads, "Row gradients")
        if num_rows != message.ids.numel():
            raise ValueError(
                f"A push needs one gradient row per id, got {message.ids.numel()} ids and {num_rows} rows."
            )
        header = [SparseKind.PUSH, message.table, num_rows, dim, dtype_code(message.grads.dtype), message.step]
        payloads = [_flat(message.ids), _flat(message.grads)]
    else:
        raise TypeError(f"Not a sparse message: {type(message).__name__}.")
    return [torch.tensor([MAGIC, _VERSION, *header], dtype=torch.int64), *payloads]


def _fields(header: torch.Tensor, sender: int) -> tuple[SparseKind, int, int, int, torch.dtype | None, int]:
    if header.dtype != torch.int64 or header.shape != (HEADER_FIELDS,):
        raise ProtocolError(
            f"Rank {sender} sent a sparse header of {header.dtype} and shape {tuple(header.shape)}; expected int64 "
            f"of shape ({HEADER_FIELDS},)."
        )
    magic, version, kind_value, table, num_ids, dim, code, step = header.tolist()
    if magic != MAGIC or version != _VERSION:
        raise ProtocolError(
            f"Rank {sender} sent a header with magic {magic:#x}, version {version}; expected {MAGIC:#x}, version "
            f"{_VERSION}. Are all processes running the same lightning_patterns?"
        )
    try:
        kind = SparseKind(kind_value)
    except ValueError:
        raise ProtocolError(f"Rank {sender} sent a sparse message of unknown kind {kind_value}.") from None
    if table < 0 or num_ids < 0 or dim < 0 or step < 0:
        raise ProtocolError(
            f"Rank {sender} sent {kind.name} with a negative field (table={table}, num_ids={num_ids}, dim={dim}, "
            f"step={step})."
        )
    dtype = None
    if kind is not SparseKind.PULL:
        if code not in DTYPES or not DTYPES[code].is_floating_point or dim < 1:
            raise ProtocolError(f"Rank {sender} sent {kind.name} with dtype code {code} and dim {dim}.")
        dtype = DTYPES[code]
    return kind, table, num_ids, dim, dtype, step


def payload_specs(header: torch.Tensor, sender: int) -> list[tuple[int, torch.dtype]]:
    """``(numel, dtype)`` of each payload the ``header`` received from rank ``sender`` announces, in order."""
    kind, _, num_ids, dim, dtype, _ = _fields(header, sender)
    specs: list[tuple[int, torch.dtype]] = []
    if kind in (SparseKind.PULL, SparseKind.PUSH):
        specs.append((num_ids, torch.int64))
    if dtype is not None:
        specs.append((num_ids * dim, dtype))
    for numel, payload_dtype in specs:
        if numel * payload_dtype.itemsize > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                f"Rank {sender} announced a {kind.name} payload of {numel * payload_dtype.itemsize} bytes, more than "
                f"the {MAX_PAYLOAD_BYTES} bytes a sparse message may carry."
            )
    return specs


def decode(header: torch.Tensor, payloads: list[torch.Tensor], sender: int) -> SparseMessage:
    """The message of ``header`` and ``payloads`` received from rank ``sender``; :class:`ProtocolError` if malformed."""
    specs = payload_specs(header, sender)
    kind, table, num_ids, dim, _, step = _fields(header, sender)
    if len(payloads) != len(specs) or any(
        payload.dtype != dtype or payload.shape != (numel,)
        for payload, (numel, dtype) in zip(payloads, specs, strict=False)
    ):
        got = [(tuple(p.shape), str(p.dtype)) for p in payloads]
        raise ProtocolError(f"Rank {sender} sent {kind.name} payloads {got}; its header announces {specs}.")
    if kind is SparseKind.PULL:
        return RowPull(table, payloads[0])
    if kind is SparseKind.ROWS:
        return RowValues(table, payloads[0].reshape(num_ids, dim))
    return RowPush(table, payloads[0], payloads[1].reshape(num_ids, dim), step)


def message_nbytes(message: SparseMessage) -> int:
    """Bytes ``message`` takes on the wire, header included."""
    return sum(tensor.numel() * tensor.element_size() for tensor in encode(message))


def step_bytes(num_unique: int, dim: int, itemsize: int, num_servers_touched: int = 1) -> int:
    """Bytes one worker moves in a step that pulls and pushes ``num_unique`` rows: the ``ps/sparse_bytes`` theory.

    >>> step_bytes(1000, 64, 4)  # 8 KB of ids twice, 256 KB of rows twice, three headers
    528192
    """
    return 2 * num_unique * (8 + dim * itemsize) + 3 * _HEADER_BYTES * num_servers_touched
