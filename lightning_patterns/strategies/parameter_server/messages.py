"""Point-to-point messages between workers and servers over a gloo process group of workers and servers.

Every message is a fixed-length ``float64`` header, optionally followed by a payload on a second tag.
Receives always name their source: gloo fails a receive from a named peer as soon as that peer's
connection drops, so a lost process is noticed at once instead of after the timeout. Every wait is
bounded, and every failure is raised as :class:`~lightning_patterns.exceptions.PeerLostError` naming the
peer's global rank.
"""

from __future__ import annotations

import datetime
import enum
import io
import pickle
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.distributed.distributed_c10d import ProcessGroupGloo

from lightning_patterns.exceptions import PeerLostError

__all__ = [
    "Header",
    "Kind",
    "P2PGroup",
    "connect_group",
    "recv_header",
    "recv_object",
    "recv_tensor",
    "send_header",
    "send_object",
    "send_tensor",
]

HEADER_TAG = 11
PAYLOAD_TAG = 12
#: Fields before the per-group learning rates.
BASE_FIELDS = 6


class Kind(enum.IntEnum):
    """What a message asks for or carries."""

    INIT = 1  # worker 0 -> server: optimizer spec and initial parameters (object payload)
    PUSH = 2  # worker -> server: gradients of the server's chunks
    PULL = 3  # worker -> server: send me your parameters
    PAUSE = 4  # worker -> server: no pushes for a while (validation, checkpointing)
    SHUTDOWN = 5  # worker -> server: this worker is done
    GET_STATE = 6  # worker -> server: send your optimizer state (object payload back)
    SET_STATE = 7  # worker -> server: load this optimizer state (object payload)
    PARAMS = 10  # server -> worker: parameters of the server's chunks
    STATE = 11  # server -> worker: optimizer state (object payload)
    ABORT = 12  # server -> worker: a peer was lost; field `lost` names it
    ACK = 13  # server -> worker: done


class P2PGroup(Protocol):
    """What the messages need of a process group: tagged point-to-point sends and receives."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        """Send ``tensors`` to rank ``dst``."""
        ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        """Receive into ``tensors`` from rank ``src``."""
        ...


@dataclass
class Header:
    """A message header.

    Attributes:
        kind: what the message is.
        step: the sender's step (pushes so far) or, from a server, its version (updates applied).
        version: for a push, the server version the gradient was computed against; for parameters, the
            staleness of the push they answer.
        numel: elements (or bytes, for objects) in the payload that follows; 0 for none.
        lost: for ``ABORT``, the global rank that was lost; otherwise -1.
        lrs: one learning rate per optimizer parameter group (pushes only).
    """

    kind: Kind
    step: int = 0
    version: int = 0
    numel: int = 0
    lost: int = -1
    lrs: tuple[float, ...] = ()

    def to_tensor(self, num_groups: int) -> torch.Tensor:
        """Encode as a ``float64`` tensor of ``BASE_FIELDS + num_groups`` values."""
        values = [float(self.kind), float(self.step), float(self.version), float(self.numel), float(self.lost), 0.0]
        lrs = list(self.lrs) + [0.0] * (num_groups - len(self.lrs))
        return torch.tensor(values + lrs, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        """Decode a tensor made by :meth:`to_tensor`."""
        v = tensor.tolist()
        return cls(Kind(int(v[0])), int(v[1]), int(v[2]), int(v[3]), int(v[4]), tuple(v[BASE_FIELDS:]))


def connect_group(address: str, port: int, rank: int, world_size: int, prefix: str, timeout: float) -> P2PGroup:
    """Join the gloo group of workers and servers through the job's rendezvous store.

    The group is separate from Lightning's default (workers-only) group, so Lightning's collectives never
    involve the servers. Every member connects to the store as a client; rank 0's default group (or
    torchrun's agent) hosts it.
    """
    delta = datetime.timedelta(seconds=timeout)
    store = TCPStore(address, port, is_master=False, timeout=delta)
    # The gloo backend object itself: it sends and receives, and Lightning never sees it.
    return cast(P2PGroup, ProcessGroupGloo(PrefixStore(prefix, store), rank, world_size, delta))


def _lost(peer: int, what: str, timeout: float, error: BaseException) -> PeerLostError:
    text = str(error)
    if "timed out" in text.lower() or "timeout" in text.lower():
        cause = f"it did not answer within timeout={timeout}s"
    else:
        cause = "its connection closed (the process died or exited)"
    return PeerLostError(
        f"Lost rank {peer} while waiting to {what}: {cause}. Check the log of rank {peer}; if it is only slow "
        f"(long validation, a slow disk), raise `ParameterServerStrategy(timeout=...)`. Underlying error: "
        f"{text.splitlines()[0] if text else type(error).__name__}"
    )


def _wait(work: dist.Work, peer: int, what: str, timeout: float) -> None:
    try:
        work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        raise _lost(peer, what, timeout, error) from error


def _send(pg: P2PGroup, tensor: torch.Tensor, dst: int, tag: int, timeout: float) -> int:
    """Send ``tensor`` to global rank ``dst`` on ``tag`` and wait for it; return the bytes sent."""
    try:
        work = pg.send([tensor], dst, tag)
    except RuntimeError as error:
        raise _lost(dst, "send to it", timeout, error) from error
    _wait(work, dst, "send to it", timeout)
    return tensor.numel() * tensor.element_size()


def _recv(pg: P2PGroup, tensor: torch.Tensor, src: int, tag: int, timeout: float) -> int:
    """Receive into ``tensor`` from global rank ``src`` on ``tag`` and wait for it; return the bytes received."""
    try:
        work = pg.recv([tensor], src, tag)
    except RuntimeError as error:
        raise _lost(src, "receive from it", timeout, error) from error
    _wait(work, src, "receive from it", timeout)
    return tensor.numel() * tensor.element_size()


def send_header(pg: P2PGroup, header: Header, dst: int, num_groups: int, timeout: float) -> int:
    """Send ``header`` to global rank ``dst``; return the bytes sent."""
    return _send(pg, header.to_tensor(num_groups), dst, HEADER_TAG, timeout)


def recv_header(pg: P2PGroup, src: int, num_groups: int, timeout: float) -> Header:
    """Receive a header from global rank ``src``."""
    tensor = torch.empty(BASE_FIELDS + num_groups, dtype=torch.float64)
    _recv(pg, tensor, src, HEADER_TAG, timeout)
    return Header.from_tensor(tensor)


def send_tensor(pg: P2PGroup, tensor: torch.Tensor, dst: int, timeout: float) -> int:
    """Send a payload (skipped when empty); return the bytes sent."""
    if tensor.numel() == 0:
        return 0
    return _send(pg, tensor, dst, PAYLOAD_TAG, timeout)


def recv_tensor(pg: P2PGroup, out: torch.Tensor, src: int, timeout: float) -> int:
    """Receive a payload into ``out`` (skipped when empty); return the bytes received."""
    if out.numel() == 0:
        return 0
    return _recv(pg, out, src, PAYLOAD_TAG, timeout)


def send_object(pg: P2PGroup, kind: Kind, obj: Any, dst: int, num_groups: int, timeout: float) -> int:
    """Pickle ``obj`` (tensors by ``torch.save``) and send it as a header plus a byte payload."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    sent = send_header(pg, Header(kind, numel=data.numel()), dst, num_groups, timeout)
    return sent + send_tensor(pg, data, dst, timeout)


def recv_object(pg: P2PGroup, header: Header, src: int, timeout: float) -> Any:
    """Receive the object payload announced by ``header``."""
    data = torch.empty(header.numel, dtype=torch.uint8)
    recv_tensor(pg, data, src, timeout)
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)
