"""The wire format: one message type per kind, sizes from the header alone, JSON and raw tensors, no pickle."""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server import messages
from lightning_patterns.strategies.parameter_server.messages import (
    HEADER_FIELDS,
    Abort,
    Init,
    Message,
    Params,
    ProtocolError,
    Push,
    PushFlags,
    SetState,
    Sum,
    decode_json,
    dtype_code,
    encode_json,
    pack_tensors,
    unpack_tensors,
)
from lightning_patterns.strategies.parameter_server.sparse import protocol

_EXAMPLES: list[Message] = [
    Init(json_bytes=120, values_numel=58, values_dtype=dtype_code(torch.float32)),
    messages.Pull(),
    Push(7, 3, 2, 1000, 1234, dtype_code(torch.bfloat16), 4, int(PushFlags.REPLACE), 0.1 / 3, 0, samples=48),
    messages.Commit(7, int(PushFlags.CHECK_FINITE), 6, 0.5, 1, 2.0**-16),
    messages.Pause(),
    messages.End(),
    messages.Fail(json_bytes=40),
    messages.GetState(),
    SetState(json_bytes=10, data_bytes=0),
    messages.Exit(),
    messages.Ack(),
    Params(5, 2, 1, 40, 58, dtype_code(torch.float64), int(PushFlags.SKIP), 1.0 / 3, 0.1, 1.0 / 48),
    Sum(3, 1, 40, 58, dtype_code(torch.float32), 4, 2.5, small_sqr=7e-9, big_sqr=1.5e12, inverse_batch=0.125),
    messages.Attach(),
    messages.Regions(json_bytes=200),
    messages.State(json_bytes=9, data_bytes=64),
    Abort(lost=1, json_bytes=30),
    # The sparse tables' messages (`sparse/protocol.py`).
    protocol.SparseInit(json_bytes=300),
    protocol.SparsePull(table=1, num_ids=17),
    protocol.SparsePush(1, 4, 17, 64, dtype_code(torch.float32), 0, 0.05),
    protocol.SparseRows(1, 17, 64, dtype_code(torch.bfloat16)),
    protocol.SparseSave(json_bytes=20),
    protocol.SparseLoad(json_bytes=20),
]


@pytest.mark.parametrize("message", _EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips_through_its_header(message: Message) -> None:
    header = message.encode()
    assert header.dtype == torch.float64
    assert header.numel() == HEADER_FIELDS
    decoded = Message.decode(header, sender=0)
    assert decoded == message  # floats exactly: float64 on the wire
    assert decoded.payloads() == message.payloads()


def test_each_kind_has_its_own_type_and_every_type_fits_a_header() -> None:
    kinds = [m.kind for m in _EXAMPLES]
    assert sorted(kinds) == sorted(messages.Kind)
    assert all(1 + len(dataclasses.fields(m)) <= HEADER_FIELDS for m in _EXAMPLES)


def test_payloads_are_announced_by_the_header() -> None:
    push = Push(offset=20, numel=10, dtype=dtype_code(torch.float32), mask_numel=3)
    assert [(p.name, p.numel, p.dtype, p.offset) for p in push.payloads()] == [
        ("mask", 3, torch.uint8, 0),
        ("grad", 10, torch.float32, 20),
    ]
    assert [p.name for p in Push(numel=10, dtype=dtype_code(torch.float32)).payloads()] == ["grad"]
    assert [(p.name, p.offset) for p in Sum(offset=5, numel=10, dtype=1).payloads()] == [("grad", 5)]
    assert [(p.name, p.offset) for p in Params(offset=7, numel=1, dtype=1).payloads()] == [("values", 7)]
    assert [(p.name, p.numel) for p in messages.Commit(hyper_numel=2).payloads()] == [("hyper", 2)]
    assert messages.Commit().payloads() == []


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([99.0], "unknown kind 99.0"),
        ([math.nan], "unknown kind nan"),
        ([float(messages.Kind.PUSH), 1.5], "step=1.5, not an integer"),
        ([float(messages.Kind.PARAMS), 0, 0, 0, 0, -4, 1], "announcing -4 elements"),
        ([float(messages.Kind.PARAMS), 0, 0, 0, -8, 4, 1], "announcing 4 elements at offset -8"),
        ([float(messages.Kind.PARAMS), 0, 0, 0, 0, 4, 77], "PARAMS: unknown dtype code 77"),
    ],
)
def test_a_malformed_header_is_refused(values: list[float], match: str) -> None:
    header = torch.zeros(HEADER_FIELDS, dtype=torch.float64)
    header[: len(values)] = torch.tensor(values, dtype=torch.float64)
    with pytest.raises(ProtocolError, match=match):
        Message.decode(header, sender=3)


def test_json_payloads_round_trip_and_anything_else_is_refused() -> None:
    obj = {"lr": 0.1, "betas": [0.9, 0.999], "name": "adamw", "nesterov": False, "foreach": None, "inf": math.inf}
    assert decode_json(encode_json(obj), "INIT") == obj
    crafted = torch.frombuffer(bytearray(pickle.dumps({"lr": 0.1})), dtype=torch.uint8)
    with pytest.raises(ProtocolError, match=r"INIT from rank 0 is not UTF-8 JSON .* never pickles"):
        decode_json(crafted, "INIT from rank 0")
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        decode_json(torch.tensor([0xFF, 0xFE], dtype=torch.uint8), "STATE")


def test_optimizer_state_packs_into_json_and_bytes() -> None:
    entries: list[dict[str, Any]] = [
        {"step": torch.tensor(3.0), "exp_avg": torch.randn(5), "exp_avg_sq": torch.rand(2, 3).double()},
        {},
        {"momentum_buffer": None, "mu_product": 0.97, "flag": True},
    ]
    described, data = pack_tensors(entries)
    assert data.dtype == torch.uint8
    assert decode_json(encode_json(described), "STATE") == described  # all JSON
    unpacked = unpack_tensors(described, data, "STATE")
    assert unpacked[1] == {}
    assert unpacked[2] == entries[2]
    for key, value in entries[0].items():
        assert unpacked[0][key].dtype == value.dtype
        torch.testing.assert_close(unpacked[0][key], value, rtol=0, atol=0)


def test_packing_refuses_what_is_not_a_tensor_or_a_number() -> None:
    with pytest.raises(ValueError, match=r"'history' is a list.*Use `update_on='worker'`"):
        pack_tensors([{"history": [torch.zeros(2)]}])
    with pytest.raises(ValueError, match=r"cannot carry tensors of dtype torch\.complex64"):
        dtype_code(torch.complex64)


@pytest.mark.parametrize(
    "described",
    [
        [{"x": {"tensor": ["float32", [4], 0, 16]}}],  # more bytes than sent
        [{"x": {"tensor": ["object", [1], 0, 4]}}],  # not a dtype of the table
        [{"x": {"tensor": ["float32", [-1], 0, 4]}}],
        [{"x": {"tensor": ["float32", [1], -4, 4]}}],
        [{"x": {"pickle": "gASV"}}],
        {"x": 1},
        ["not an entry"],
    ],
)
def test_unpacking_refuses_descriptions_that_do_not_fit(described: Any) -> None:
    with pytest.raises(ProtocolError, match="STATE from rank 2"):
        unpack_tensors(described, torch.zeros(8, dtype=torch.uint8), "STATE from rank 2")
