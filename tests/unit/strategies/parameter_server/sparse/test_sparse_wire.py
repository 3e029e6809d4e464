"""The sparse wire format: raw tensors round-trip, sizes come from the header, malformed messages are refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server.messages import ProtocolError
from lightning_patterns.strategies.parameter_server.sparse.wire import (
    HEADER_FIELDS,
    MAGIC,
    RowPull,
    RowPush,
    RowValues,
    decode,
    encode,
    message_nbytes,
    payload_specs,
    step_bytes,
)


def _receive(tensors: list[torch.Tensor], sender: int = 3) -> Any:
    """What a receiver does: read the header, allocate each announced payload, fill it, decode."""
    header, payloads = tensors[0], tensors[1:]
    buffers = [torch.empty(numel, dtype=dtype) for numel, dtype in payload_specs(header, sender)]
    assert len(buffers) == len(payloads)
    for buffer, payload in zip(buffers, payloads, strict=True):
        buffer.copy_(payload)
    return decode(header, buffers, sender)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_messages_round_trip(dtype: torch.dtype) -> None:
    ids = torch.tensor([9, 2, 2**40])
    pull = _receive(encode(RowPull(table=2, ids=ids)))
    assert isinstance(pull, RowPull)
    assert pull.table == 2
    assert torch.equal(pull.ids, ids)
    rows = torch.randn(3, 5).to(dtype)
    values = _receive(encode(RowValues(table=1, rows=rows)))
    assert isinstance(values, RowValues)
    assert torch.equal(values.rows, rows)
    push = _receive(encode(RowPush(table=0, ids=ids, grads=rows, step=41)))
    assert isinstance(push, RowPush)
    assert push.step == 41
    assert torch.equal(push.ids, ids)
    assert torch.equal(push.grads, rows)


def test_bytes_of_a_step_match_the_theory() -> None:
    """ids + rows × dim × itemsize for the pull, its reply and the push, plus three headers."""
    ids, rows = torch.arange(1_000), torch.zeros(1_000, 64)
    moved = sum(message_nbytes(m) for m in (RowPull(0, ids), RowValues(0, rows), RowPush(0, ids, rows)))
    assert moved == step_bytes(1_000, 64, 4) == 2 * 1_000 * (8 + 64 * 4) + 3 * HEADER_FIELDS * 8


def _header(**fields: int) -> torch.Tensor:
    values = {"magic": MAGIC, "version": 1, "kind": 2, "table": 0, "num_ids": 2, "dim": 3, "dtype": 1, "step": 0}
    values.update(fields)
    return torch.tensor(list(values.values()), dtype=torch.int64)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (torch.zeros(HEADER_FIELDS), "Rank 3 sent a sparse header of torch.float32"),
        (_header(magic=1), "Rank 3 sent a header with magic 0x1, version 1; expected 0x53505253"),
        (_header(version=2), "Are all processes running the same lightning_patterns?"),
        (_header(kind=9), "Rank 3 sent a sparse message of unknown kind 9"),
        (_header(num_ids=-1), "Rank 3 sent ROWS with a negative field"),
        (_header(dtype=9), "Rank 3 sent ROWS with dtype code 9 and dim 3"),
        (_header(dim=0), "Rank 3 sent ROWS with dtype code 1 and dim 0"),
        (_header(num_ids=2**40, dim=64), "more than the 4294967296 bytes a sparse message may carry"),
    ],
)
def test_malformed_headers_are_refused(header: torch.Tensor, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        payload_specs(header, sender=3)


def test_payloads_must_match_the_header() -> None:
    header, ids = encode(RowPull(0, torch.arange(4)))
    with pytest.raises(ProtocolError, match=re.escape("Rank 1 sent PULL payloads [((3,), 'torch.int64')]")):
        decode(header, [ids[:3]], sender=1)
    with pytest.raises(ProtocolError, match=re.escape("its header announces")):
        decode(header, [ids.float()], sender=1)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (RowPull(0, torch.tensor([1.0])), "Row ids travel as a 1-D int64 tensor, got torch.float32"),
        (RowValues(0, torch.zeros(3)), "Rows travel as a 2-D floating tensor [rows, dim]"),
        (RowPush(0, torch.arange(2), torch.zeros(3, 2)), "A push needs one gradient row per id, got 2 ids and 3 rows"),
        (RowValues(0, torch.zeros(2, 2, dtype=torch.complex64)), "Rows travel as a 2-D floating tensor"),
    ],
)
def test_encoding_refuses_what_the_format_cannot_carry(message: Any, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        encode(message)
