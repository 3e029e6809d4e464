"""A process's end of the worker-and-server group: whole messages to and from named ranks, every wait bounded.

A :class:`Transport` moves tagged tensors between global ranks (a gloo process group today; issue 13 adds shared
memory between processes of one host). A :class:`Link` sends and receives :mod:`messages` over it: a header on
one tag, then the payloads the header announces on a second, and small server-to-server exchanges on a third.
Receives always name their source: gloo fails a receive from a named peer as soon as that peer's connection
drops, so a lost process is noticed at once instead of after the timeout. Every failure is raised as
:class:`~lightning_patterns.exceptions.PeerLostError` naming the peer's global rank.

A gloo send completes only once the receiver has posted the matching receive, so two processes that must send to
each other post their receives first (:meth:`Link.exchange`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.distributed.distributed_c10d import ProcessGroupGloo

from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.messages import HEADER_FIELDS, Message

__all__ = ["Link", "Transport", "connect_group"]

HEADER_TAG = 11
PAYLOAD_TAG = 12
PEER_TAG = 13


class Transport(Protocol):
    """Tagged point-to-point tensor sends and receives between global ranks (``ProcessGroupGloo`` has these)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        """Start sending ``tensors`` to rank ``dst``."""
        ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        """Start receiving into ``tensors`` from rank ``src``."""
        ...


class Link:
    """Messages between this process (global rank ``rank``) and its peers over ``transport``.

    Args:
        transport: the worker-and-server group.
        rank: this process's global rank.
        timeout: default bound, in seconds, on every wait.
    """

    def __init__(self, transport: Transport, rank: int, timeout: float) -> None:
        self.transport = transport
        self.rank = rank
        self.timeout = timeout

    def send(
        self,
        message: Message,
        dst: int,
        payloads: Mapping[str, torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send ``message`` and the payloads it announces to rank ``dst``; return the bytes sent."""
        specs = message.payloads()
        names = {spec.name for spec in specs}
        # An empty payload is announced by a zero size, so it is not sent at all.
        payloads = {n: t for n, t in (payloads or {}).items() if n in names or t.numel()}
        if sorted(payloads) != sorted(names):
            raise ValueError(f"{type(message).__name__} announces {[s.name for s in specs]}, got {sorted(payloads)}.")
        sent = self._send(message.encode(), dst, HEADER_TAG, timeout)
        for spec in specs:
            tensor = payloads[spec.name]
            if tensor.numel() != spec.numel or tensor.dtype != spec.dtype or not tensor.is_contiguous():
                raise ValueError(
                    f"{type(message).__name__} payload {spec.name!r} must be {spec.numel} contiguous {spec.dtype}, "
                    f"got {tensor.numel()} {tensor.dtype}."
                )
            sent += self._send(tensor, dst, PAYLOAD_TAG, timeout)
        return sent

    def recv(
        self, src: int, timeout: float | None = None, into: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Message, dict[str, torch.Tensor], int]:
        """Receive one message and its payloads from rank ``src``; return them and the bytes received.

        A payload is received into ``into[name]`` when that buffer has its size and dtype, else into a new tensor.
        """
        header = torch.empty(HEADER_FIELDS, dtype=torch.float64)
        received = self._recv(header, src, HEADER_TAG, timeout)
        message = Message.decode(header, src)
        payloads: dict[str, torch.Tensor] = {}
        for spec in message.payloads():
            buffer = (into or {}).get(spec.name)
            if buffer is None or buffer.numel() != spec.numel or buffer.dtype != spec.dtype:
                buffer = torch.empty(spec.numel, dtype=spec.dtype)
            received += self._recv(buffer, src, PAYLOAD_TAG, timeout)
            payloads[spec.name] = buffer
        return message, payloads, received

    def exchange(self, tensor: torch.Tensor, peers: Sequence[int], timeout: float | None = None) -> list[torch.Tensor]:
        """Send ``tensor`` to every rank of ``peers`` and receive theirs (same size); return theirs, in order."""
        received = [torch.empty_like(tensor) for _ in peers]
        works = []
        for peer, out in zip(peers, received, strict=True):
            works.append((peer, self._start(self.transport.recv, out, peer, PEER_TAG, "receive from it", timeout)))
        for peer in peers:
            self._send(tensor, peer, PEER_TAG, timeout)
        for peer, work in works:
            _wait(work, peer, "receive from it", self._bound(timeout))
        return received

    # -- one tensor --------------------------------------------------------------------------------------------------
    def _bound(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _start(
        self, op: Callable[..., dist.Work], tensor: torch.Tensor, peer: int, tag: int, what: str, timeout: float | None
    ) -> dist.Work:
        try:
            return op([tensor], peer, tag)
        except RuntimeError as error:
            raise _lost(peer, what, self._bound(timeout), error) from error

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, timeout: float | None) -> int:
        return self._transfer(self.transport.send, tensor, dst, tag, "send to it", timeout)

    def _recv(self, tensor: torch.Tensor, src: int, tag: int, timeout: float | None) -> int:
        return self._transfer(self.transport.recv, tensor, src, tag, "receive from it", timeout)

    def _transfer(
        self, op: Callable[..., dist.Work], tensor: torch.Tensor, peer: int, tag: int, what: str, timeout: float | None
    ) -> int:
        """One send or receive of ``tensor``, waited for; the bytes moved (an empty tensor moves nothing)."""
        if tensor.numel() == 0:
            return 0
        _wait(self._start(op, tensor, peer, tag, what, timeout), peer, what, self._bound(timeout))
        return tensor.numel() * tensor.element_size()


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


def connect_group(address: str, port: int, rank: int, world_size: int, prefix: str, timeout: float) -> Transport:
    """Join the gloo group of workers and servers through the job's rendezvous store.

    The group is separate from Lightning's default (workers-only) group, so Lightning's collectives never involve
    the servers. Every member connects to the store as a client; rank 0's default group (or torchrun's agent)
    hosts it. Joining waits up to ``timeout`` seconds for every member.
    """
    delta = datetime.timedelta(seconds=timeout)
    store = TCPStore(address, port, is_master=False, timeout=delta)
    # The gloo backend object itself: it sends and receives, and Lightning never sees it.
    return cast(Transport, ProcessGroupGloo(PrefixStore(prefix, store), rank, world_size, delta))
