"""The parameter-server wire format: one message type per kind, tensors and JSON, never pickle.

Every message is a fixed-length ``float64`` header (:data:`HEADER_FIELDS` values: the kind, then the fields of
that kind's type, zero-padded), followed by the payloads its fields announce, in a fixed order. A payload is a
flat tensor of a dtype from :data:`DTYPES`; structured data (an optimizer's description, optimizer state, an
error) travels as UTF-8 JSON bytes plus raw tensor bytes described by that JSON. Decoding never runs code: a
header is numbers, JSON is parsed by :func:`json.loads`, tensor bytes are reinterpreted with a dtype from a fixed
table, and anything else is refused with :class:`ProtocolError`. The optimizer is named (a key of
``ELEMENTWISE_OPTIMIZERS``), never sent as a class.

Payload sizes come from the header alone, so a receiver needs no other state to read a whole message.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "Abort",
    "Ack",
    "Attach",
    "Commit",
    "DTYPES",
    "End",
    "Exit",
    "Fail",
    "GetState",
    "HEADER_FIELDS",
    "Init",
    "Kind",
    "Message",
    "Params",
    "Pause",
    "PayloadSpec",
    "ProtocolError",
    "Pull",
    "Push",
    "PushFlags",
    "Regions",
    "SetState",
    "State",
    "Sum",
    "decode_json",
    "dtype_code",
    "encode_json",
    "pack_tensors",
    "unpack_tensors",
]

#: Values in every header: the kind and up to 11 fields.
HEADER_FIELDS = 12
#: The most bytes of JSON a message may carry (optimizer descriptions and state layouts are far smaller).
MAX_JSON_BYTES = 64 * 1024 * 1024

#: The dtypes a payload or a packed tensor may have, by wire code.
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.float16,
    4: torch.bfloat16,
    5: torch.uint8,
    6: torch.int8,
    7: torch.int16,
    8: torch.int32,
    9: torch.int64,
    10: torch.bool,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}


class ProtocolError(ValueError):
    """A message that does not follow the protocol: unknown kind, bad sizes, malformed JSON or tensor bytes."""


class Kind(enum.IntEnum):
    """What a message is; its type (a :class:`Message` subclass) gives its fields."""

    # worker -> server
    INIT = 1
    PULL = 2
    PUSH = 3
    PAUSE = 4
    END = 5
    FAIL = 6
    GET_STATE = 7
    SET_STATE = 8
    EXIT = 9
    ATTACH = 10
    COMMIT = 11
    SPARSE_INIT = 12
    SPARSE_PULL = 13
    SPARSE_PUSH = 14
    SPARSE_SAVE = 15
    SPARSE_LOAD = 16
    # server -> worker
    ACK = 20
    PARAMS = 21
    SUM = 22
    STATE = 23
    ABORT = 24
    REGIONS = 25
    SPARSE_ROWS = 26


class PushFlags(enum.IntFlag):
    """Flags of a :class:`Push` and of its reply."""

    NONE = 0
    #: ``Commit``: the servers must check the averaged gradient for inf/NaN and skip the step everywhere if any.
    CHECK_FINITE = 1
    #: ``Commit`` (async): do not apply this gradient (the worker found inf/NaN). ``Params``: the step was skipped.
    SKIP = 2
    #: ``Push``: this bucket replaces the one pushed earlier in this round (its gradient changed after the push).
    REPLACE = 4


@dataclass(frozen=True)
class PayloadSpec:
    """One payload that follows a header: a name, a number of elements, a dtype, and where it goes.

    Attributes:
        name: the payload's name.
        numel: its number of elements.
        dtype: its dtype.
        offset: the element it starts at in the receiver's flat buffer of that name (a pair that shares memory
            reads it there, in place).
    """

    name: str
    numel: int
    dtype: torch.dtype
    offset: int = 0


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; raises for a dtype the protocol does not carry."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(
            f"The parameter server cannot carry tensors of dtype {dtype}; expected one of "
            f"{sorted(_NAMES)}. Convert the model with a precision plugin or `model.float()`."
        ) from None


def _dtype(code: int, what: str) -> torch.dtype:
    try:
        return DTYPES[code]
    except KeyError:
        raise ProtocolError(f"{what}: unknown dtype code {code}; expected one of {sorted(DTYPES)}.") from None


_BY_KIND: dict[Kind, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    """Base of the message types. A subclass names its ``kind`` and declares its fields (``int`` or ``float``)."""

    kind: ClassVar[Kind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):  # a message type, not a shared base
            _BY_KIND[cls.kind] = cls

    def payloads(self) -> list[PayloadSpec]:
        """The payloads that follow this header, in order (none by default)."""
        return []

    def encode(self) -> torch.Tensor:
        """The header as a ``float64`` tensor of :data:`HEADER_FIELDS` values."""
        values = [float(self.kind)] + [float(getattr(self, f.name)) for f in dataclasses.fields(self)]
        return torch.tensor(values + [0.0] * (HEADER_FIELDS - len(values)), dtype=torch.float64)

    @staticmethod
    def decode(header: torch.Tensor, sender: int) -> Message:
        """The message a header received from global rank ``sender`` encodes; :class:`ProtocolError` if none."""
        values = header.tolist()
        try:
            cls = _BY_KIND[Kind(int(values[0]))]
        except (ValueError, KeyError, OverflowError):
            raise ProtocolError(f"Rank {sender} sent a message of unknown kind {values[0]!r}.") from None
        kwargs: dict[str, Any] = {}
        for value, field in zip(values[1:], dataclasses.fields(cls), strict=False):
            if field.type == "float":
                kwargs[field.name] = value
                continue
            if not float(value).is_integer():
                raise ProtocolError(f"Rank {sender} sent {cls.kind.name} with {field.name}={value!r}, not an integer.")
            kwargs[field.name] = int(value)
        message = cls(**kwargs)
        for spec in message.payloads():
            if spec.numel < 0 or spec.offset < 0:
                raise ProtocolError(
                    f"Rank {sender} sent {cls.kind.name} announcing {spec.numel} elements at offset {spec.offset}."
                )
        return message


def _json_payload(numel: int) -> list[PayloadSpec]:
    return [PayloadSpec("json", numel, torch.uint8)] if numel else []


# -- worker -> server ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Init(Message):
    """Rank 0 starts a fit: the fit's description as JSON, then (``"server"`` placement) the initial values."""

    kind: ClassVar[Kind] = Kind.INIT
    json_bytes: int = 0
    values_numel: int = 0
    values_dtype: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """JSON, then the values of the server's chunks when it holds parameters."""
        values = (
            [PayloadSpec("values", self.values_numel, _dtype(self.values_dtype, "INIT"))] if self.values_numel else []
        )
        return _json_payload(self.json_bytes) + values


@dataclass(frozen=True)
class Pull(Message):
    """Send me the parameters of your chunks."""

    kind: ClassVar[Kind] = Kind.PULL


@dataclass(frozen=True)
class Push(Message):
    """One bucket of one worker's gradient of the server's chunks, for one round.

    A bucket is a contiguous range of the server's chunks (:mod:`~.buckets`); a worker pushes each bucket of each
    round once, in any order, as soon as backward has produced it (again, flagged ``REPLACE``, if it changed).

    Attributes:
        step: rounds this worker started before this one, in this fit.
        version: the server version the gradient was computed on (the ``version`` of the last parameters pulled).
        bucket: the bucket's index among the server's buckets.
        offset: the bucket's first element in the server's flat buffer.
        numel: elements of the gradient payload (the bucket's).
        dtype: wire code of the gradient's dtype.
        mask_numel: elements of the presence mask that precedes the gradient (``0``: every chunk has a gradient);
            one ``uint8`` per chunk of the bucket, ``0`` where the parameter had no gradient.
        flags: :class:`PushFlags` (``REPLACE``).
        loss: the worker's loss, averaged by the servers (``"worker"`` placement).
        scaled: ``1`` when the gradient is already divided by the number of workers, ``0`` when the server must.
        samples: the samples this worker's gradient of the round is a mean over, when the servers should measure
            the gradient norms of the round (:mod:`~lightning_patterns.strategies.parameter_server.norms`);
            ``0``: do not measure.
    """

    kind: ClassVar[Kind] = Kind.PUSH
    step: int = 0
    version: int = 0
    bucket: int = 0
    offset: int = 0
    numel: int = 0
    dtype: int = 0
    mask_numel: int = 0
    flags: int = 0
    loss: float = 0.0
    scaled: int = 1
    samples: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The mask (when announced), then the gradient."""
        specs = []
        if self.mask_numel:
            specs.append(PayloadSpec("mask", self.mask_numel, torch.uint8))
        specs.append(PayloadSpec("grad", self.numel, _dtype(self.dtype, "PUSH"), self.offset))
        return specs


@dataclass(frozen=True)
class Commit(Message):
    """``"server"`` placement: this worker's pushes of the round are final; here is how to apply them.

    Attributes:
        step: the round.
        flags: :class:`PushFlags` (``CHECK_FINITE``, ``SKIP``).
        hyper_numel: elements of the hyperparameter vector that follows (``0``: unchanged since this worker's
            last commit).
        clip_value: gradient clipping the servers apply to the averaged gradient (``0``: none).
        clip_norm: ``1`` to clip by the norm over all servers' chunks, ``0`` to clip each value.
        unscale: multiply the averaged gradient by this before anything else (a GradScaler's inverse scale; ``1``:
            none).
    """

    kind: ClassVar[Kind] = Kind.COMMIT
    step: int = 0
    flags: int = 0
    hyper_numel: int = 0
    clip_value: float = 0.0
    clip_norm: int = 0
    unscale: float = 1.0

    def payloads(self) -> list[PayloadSpec]:
        """The hyperparameters, when announced."""
        return [PayloadSpec("hyper", self.hyper_numel, torch.float64)] if self.hyper_numel else []


@dataclass(frozen=True)
class Pause(Message):
    """No pushes from this worker for a while (validation, checkpointing): do not count its silence."""

    kind: ClassVar[Kind] = Kind.PAUSE


@dataclass(frozen=True)
class End(Message):
    """This worker finished its fit successfully."""

    kind: ClassVar[Kind] = Kind.END


@dataclass(frozen=True)
class _Described(Message):
    """A message whose content is one JSON payload of ``json_bytes`` bytes."""

    json_bytes: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The JSON."""
        return _json_payload(self.json_bytes)


@dataclass(frozen=True)
class Fail(_Described):
    """This worker failed; the JSON (``{"error": ...}``) says how. The servers stop the job."""

    kind: ClassVar[Kind] = Kind.FAIL


@dataclass(frozen=True)
class GetState(Message):
    """Send me your optimizer state."""

    kind: ClassVar[Kind] = Kind.GET_STATE


@dataclass(frozen=True)
class _PackedState(Message):
    """Optimizer state: JSON describing each chunk's entries (:func:`pack_tensors`), then their tensor bytes."""

    json_bytes: int = 0
    data_bytes: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The JSON, then the tensor bytes."""
        data = [PayloadSpec("data", self.data_bytes, torch.uint8)] if self.data_bytes else []
        return _json_payload(self.json_bytes) + data


@dataclass(frozen=True)
class SetState(_PackedState):
    """Load this optimizer state."""

    kind: ClassVar[Kind] = Kind.SET_STATE


@dataclass(frozen=True)
class Attach(Message):
    """This worker shares memory with the server (same host): send me the fit's regions."""

    kind: ClassVar[Kind] = Kind.ATTACH


@dataclass(frozen=True)
class Exit(Message):
    """Between fits: the server process may exit (another fit needs other servers, or the job is over)."""

    kind: ClassVar[Kind] = Kind.EXIT


# -- server -> worker ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ack(Message):
    """Done (an ``INIT`` or a ``SET_STATE``)."""

    kind: ClassVar[Kind] = Kind.ACK


@dataclass(frozen=True)
class Params(Message):
    """One bucket of the parameters of the server's chunks (``"server"`` placement).

    Attributes:
        version: updates the server has applied.
        staleness: updates between the pull the answered push was computed on and its application.
        bucket: the bucket's index among the server's buckets.
        offset: its first element in the server's flat buffer.
        numel: elements of the payload.
        dtype: wire code of its dtype.
        flags: :attr:`PushFlags.SKIP` when the step was skipped (inf/NaN in the averaged gradient).
        small_sqr: the bucket's gradient norms when the round was measured (``0`` otherwise): see
            :mod:`~lightning_patterns.strategies.parameter_server.norms`.
        big_sqr: see :mod:`~lightning_patterns.strategies.parameter_server.norms`.
        inverse_batch: see :mod:`~lightning_patterns.strategies.parameter_server.norms` (``0``: not measured).
    """

    kind: ClassVar[Kind] = Kind.PARAMS
    version: int = 0
    staleness: int = 0
    bucket: int = 0
    offset: int = 0
    numel: int = 0
    dtype: int = 0
    flags: int = 0
    small_sqr: float = 0.0
    big_sqr: float = 0.0
    inverse_batch: float = 0.0

    def payloads(self) -> list[PayloadSpec]:
        """The parameter values."""
        return [PayloadSpec("values", self.numel, _dtype(self.dtype, "PARAMS"), self.offset)]


@dataclass(frozen=True)
class Sum(Message):
    """One bucket of the workers' averaged gradient of the server's chunks (``"worker"`` placement).

    Attributes:
        round: rounds completed, this one included.
        bucket: the bucket's index among the server's buckets.
        offset: its first element in the server's flat buffer.
        numel: elements of the gradient payload.
        dtype: wire code of its dtype.
        mask_numel: elements of the presence mask before it (``0``: every chunk of the bucket had a gradient on
            some worker).
        loss: the workers' mean loss.
        small_sqr: the bucket's gradient norms when the round was measured (``0`` otherwise): see
            :mod:`~lightning_patterns.strategies.parameter_server.norms`.
        big_sqr: see :mod:`~lightning_patterns.strategies.parameter_server.norms`.
        inverse_batch: see :mod:`~lightning_patterns.strategies.parameter_server.norms` (``0``: not measured).
    """

    kind: ClassVar[Kind] = Kind.SUM
    round: int = 0
    bucket: int = 0
    offset: int = 0
    numel: int = 0
    dtype: int = 0
    mask_numel: int = 0
    loss: float = 0.0
    small_sqr: float = 0.0
    big_sqr: float = 0.0
    inverse_batch: float = 0.0

    def payloads(self) -> list[PayloadSpec]:
        """The presence mask (when announced), then the averaged gradient."""
        mask = [PayloadSpec("mask", self.mask_numel, torch.uint8)] if self.mask_numel else []
        return [*mask, PayloadSpec("grad", self.numel, _dtype(self.dtype, "SUM"), self.offset)]


@dataclass(frozen=True)
class Regions(_Described):
    """The shared memory of the fit, for one worker of the server's host: JSON naming each region."""

    kind: ClassVar[Kind] = Kind.REGIONS


@dataclass(frozen=True)
class State(_PackedState):
    """The server's optimizer state."""

    kind: ClassVar[Kind] = Kind.STATE


@dataclass(frozen=True)
class Abort(Message):
    """The job stops: rank ``lost`` was lost or failed (``-1``: unknown); the JSON (``{"error": ...}``) says why."""

    kind: ClassVar[Kind] = Kind.ABORT
    lost: int = -1
    json_bytes: int = 0

    def payloads(self) -> list[PayloadSpec]:
        """The JSON."""
        return _json_payload(self.json_bytes)


# -- JSON and tensor bytes -------------------------------------------------------------------------------------------
def encode_json(obj: Any) -> torch.Tensor:
    """``obj`` as UTF-8 JSON bytes in a ``uint8`` tensor."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_json(payload: torch.Tensor, what: str) -> Any:
    """Parse a JSON payload; :class:`ProtocolError` (naming ``what``) for anything that is not UTF-8 JSON."""
    if payload.numel() > MAX_JSON_BYTES:
        raise ProtocolError(f"{what}: {payload.numel()} bytes of JSON, more than the {MAX_JSON_BYTES} allowed.")
    try:
        return json.loads(payload.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(
            f"{what} is not UTF-8 JSON ({error}); refused. Parameter-server messages carry JSON and raw tensors, "
            "never pickles: is a process of another version, or not of this job, talking to this port?"
        ) from None


def pack_tensors(entries: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Split dicts of tensors and plain values into a JSON-able description and one ``uint8`` tensor of bytes.

    Each entry becomes ``{key: {"tensor": [dtype, shape, offset, nbytes]} | {"value": value}}``; tensors are
    copied to host memory.
    """
    described: list[dict[str, Any]] = []
    pieces: list[torch.Tensor] = []
    offset = 0
    for entry in entries:
        out: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                dtype_code(value.dtype)  # refuse what the table lacks
                data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                name = str(value.dtype).removeprefix("torch.")
                out[key] = {"tensor": [name, list(value.shape), offset, data.numel()]}
                pieces.append(data)
                offset += data.numel()
            elif value is None or isinstance(value, (bool, int, float, str)):
                out[key] = {"value": value}
            else:
                raise ValueError(
                    f"Optimizer state entry {key!r} is a {type(value).__name__}; the parameter server moves "
                    "tensors and plain numbers only. Use `update_on='worker'` for this optimizer."
                )
        described.append(out)
    data = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
    return described, data


def unpack_tensors(described: Any, data: torch.Tensor, what: str) -> list[dict[str, Any]]:
    """Invert :func:`pack_tensors`, checking every name, dtype and byte range; :class:`ProtocolError` if wrong."""
    if not isinstance(described, list):
        raise ProtocolError(f"{what}: expected a list of entries, got {type(described).__name__}.")
    entries: list[dict[str, Any]] = []
    for entry in described:
        if not isinstance(entry, dict):
            raise ProtocolError(f"{what}: an entry is a {type(entry).__name__}, not an object.")
        out: dict[str, Any] = {}
        for key, item in entry.items():
            if isinstance(item, dict) and set(item) == {"value"}:
                out[key] = item["value"]
                continue
            try:
                name, shape, offset, nbytes = item["tensor"]
                dtype = _NAMES[name]
                if offset < 0 or nbytes < 0 or offset + nbytes > data.numel() or any(d < 0 for d in shape):
                    raise ValueError("byte range or shape out of bounds")
                tensor = data[offset : offset + nbytes].clone().view(dtype).reshape(shape)
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise ProtocolError(f"{what}: entry {key!r} is not a valid tensor description ({error}).") from None
            out[key] = tensor
        entries.append(out)
    return entries
