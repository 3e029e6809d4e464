"""A process's end of the worker-and-server group: whole messages to and from named ranks, every wait bounded.

Two layers:

- The :class:`Group` (a gloo process group of workers and servers) carries every message's header, the small
  payloads (JSON, masks, hyperparameters), and the bulk payloads of pairs that do not share memory. Receives
  always name their source: gloo fails a receive from a named peer as soon as that peer's connection drops, so a
  lost process is noticed at once instead of after the timeout.
- A :class:`Transport` per peer decides where the bulk payloads of that pair travel, from the pair's placement
  (:data:`TRANSPORTS`): ``"tcp"`` (:class:`TcpTransport`) sends them on the group, like the headers;
  ``"shm"`` (:class:`SharedMemoryTransport`, processes of one host) reads and writes them in place in regions of
  shared memory (:mod:`~lightning_patterns.strategies.parameter_server.shm`) that both ends attached for the fit:
  no socket, no serialisation; the header, sent after the payload was written, tells the peer it is there.

A header goes on one tag, the payloads the header announces on a second, small server-to-server exchanges on a
third. A gloo send completes only once the receiver has posted the matching receive: :meth:`Link.post` starts a
send without waiting (the caller keeps its :class:`Pending` and waits before reusing the buffers), and
:meth:`Link.prepost` posts header receives ahead, so that a peer's replies complete while this process computes.
Every failure is raised as :class:`~lightning_patterns.exceptions.PeerLostError` naming the peer's global rank.

A payload a transport has no region for (a size the fit did not declare, for example the variable-size rows of
sparse updates) travels on the group: both ends decide alike from the header and the regions they attached.
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.distributed.distributed_c10d import ProcessGroupGloo

from lightning_patterns._registry import Registry
from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.messages import HEADER_FIELDS, Message, PayloadSpec
from lightning_patterns.strategies.parameter_server.shm import HostCard, shared_memory_available

__all__ = [
    "Group",
    "Link",
    "Pending",
    "SharedMemoryTransport",
    "TRANSPORTS",
    "TcpTransport",
    "Transport",
    "choose_transport",
    "connect_group",
    "open_link",
]

HEADER_TAG = 11
PAYLOAD_TAG = 12
PEER_TAG = 13


class Group(Protocol):
    """Tagged point-to-point tensor sends and receives between global ranks (``ProcessGroupGloo`` has these)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        """Start sending ``tensors`` to rank ``dst``."""
        ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        """Start receiving into ``tensors`` from rank ``src``."""
        ...


# -- transports ------------------------------------------------------------------------------------------------------
class Transport(ABC):
    """Where the bulk payloads between this process and one peer travel (headers always go on the group).

    A payload for which :meth:`outgoing` (sending) or :meth:`incoming` (receiving) returns a tensor is written
    or read there, in place; any other payload is sent on the group.
    """

    name: ClassVar[str]

    @abstractmethod
    def outgoing(self, spec: PayloadSpec) -> torch.Tensor | None:
        """The memory the peer reads payload ``spec`` from, if this pair shares one; else ``None``."""

    @abstractmethod
    def incoming(self, spec: PayloadSpec) -> torch.Tensor | None:
        """The memory the peer wrote payload ``spec`` to, if this pair shares one; else ``None``."""


class TcpTransport(Transport):
    """Every payload on the group (gloo over TCP): the transport between hosts, and the fallback."""

    name = "tcp"

    def outgoing(self, spec: PayloadSpec) -> torch.Tensor | None:
        """Never shared."""
        return None

    def incoming(self, spec: PayloadSpec) -> torch.Tensor | None:
        """Never shared."""
        return None


class SharedMemoryTransport(Transport):
    """Bulk payloads in regions of shared memory both ends attached for the fit; the rest on the group.

    A payload named ``name`` travels through the region attached under that name (one for each direction)
    when its elements ``[offset, offset + numel)`` fit and its dtype matches; otherwise on the group. Until
    regions are attached (and after :meth:`detach`) it behaves as :class:`TcpTransport`.
    """

    name = "shm"

    def __init__(self) -> None:
        self._outgoing: dict[str, torch.Tensor] = {}
        self._incoming: dict[str, torch.Tensor] = {}

    def attach(
        self, outgoing: Mapping[str, torch.Tensor] | None = None, incoming: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Use these flat tensors (views of shared regions) for the payloads of these names, from now on."""
        self._outgoing.update(outgoing or {})
        self._incoming.update(incoming or {})

    def detach(self) -> None:
        """Forget the regions (the fit ended): payloads go on the group again."""
        self._outgoing.clear()
        self._incoming.clear()

    @property
    def attached(self) -> bool:
        """Whether any region is attached."""
        return bool(self._outgoing or self._incoming)

    @staticmethod
    def _view(regions: dict[str, torch.Tensor], spec: PayloadSpec) -> torch.Tensor | None:
        region = regions.get(spec.name)
        if region is None or region.dtype != spec.dtype or spec.offset < 0:
            return None
        if spec.offset + spec.numel > region.numel():
            return None
        return region[spec.offset : spec.offset + spec.numel]

    def outgoing(self, spec: PayloadSpec) -> torch.Tensor | None:
        """The attached outgoing region's slice for ``spec``, if it fits."""
        return self._view(self._outgoing, spec)

    def incoming(self, spec: PayloadSpec) -> torch.Tensor | None:
        """The attached incoming region's slice for ``spec``, if it fits."""
        return self._view(self._incoming, spec)


#: Transports by name (``ParameterServerStrategy(transport=...)``; ``"auto"`` picks one per pair).
TRANSPORTS: Registry[type[Transport]] = Registry("transport")
for _transport in (SharedMemoryTransport, TcpTransport):
    TRANSPORTS.register(_transport.name, _transport)


def choose_transport(requested: str, shared_memory_possible: bool) -> str:
    """The transport of one worker-server pair: ``"shm"`` where the pair can share memory and ``requested`` allows.

    Args:
        requested: ``"auto"``, ``"shm"`` or ``"tcp"``.
        shared_memory_possible: whether the pair runs on one host and the worker could map the server's probe.

    Raises:
        ValueError: ``requested="shm"`` for a pair that cannot share memory.
    """
    if requested == "tcp":
        return "tcp"
    if shared_memory_possible:
        return "shm"
    if requested == "shm":
        raise ValueError("transport='shm' needs every worker and server on one host")
    return "tcp"


# -- messages --------------------------------------------------------------------------------------------------------
class Pending:
    """Sends started by :meth:`Link.post`; the tensors they read stay referenced until :meth:`wait` returns.

    Attributes:
        peer: the destination's global rank.
        nbytes: bytes of the message, payloads included (whichever way they travel).
    """

    def __init__(self, peer: int, works: list[dist.Work], tensors: list[torch.Tensor], nbytes: int) -> None:
        self.peer = peer
        self.nbytes = nbytes
        self._works = works
        self._tensors = tensors

    def done(self) -> bool:
        """Whether every send completed (a failed one counts as done; :meth:`wait` raises it)."""
        return all(work.is_completed() for work in self._works)

    def wait(self, timeout: float) -> None:
        """Wait for every send; :class:`PeerLostError` naming the peer if one fails or times out."""
        for work in self._works:
            _wait(work, self.peer, "send to it", timeout)
        self._works, self._tensors = [], []


class Link:
    """Messages between this process (global rank ``rank``) and its peers over ``group`` and the pairs' transports.

    Args:
        group: the worker-and-server group.
        rank: this process's global rank.
        timeout: default bound, in seconds, on every wait.
        cards: every rank's :class:`~lightning_patterns.strategies.parameter_server.shm.HostCard` (from the
            join), by global rank; empty when unknown (then no pair shares memory).
    """

    def __init__(self, group: Group, rank: int, timeout: float, cards: Mapping[int, HostCard] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.timeout = timeout
        self.cards = dict(cards or {})
        self.transports: dict[int, Transport] = {}
        self._posted: dict[int, deque[tuple[torch.Tensor, dist.Work]]] = {}

    def transport(self, peer: int) -> Transport:
        """The transport of the pair (this process, ``peer``): TCP unless one was set."""
        return self.transports.get(peer) or _TCP

    def shared_memory(self, peer: int) -> SharedMemoryTransport | None:
        """The pair's shared-memory transport, if it has one."""
        transport = self.transports.get(peer)
        return transport if isinstance(transport, SharedMemoryTransport) else None

    def outgoing(self, dst: int, spec: PayloadSpec) -> torch.Tensor | None:
        """Where to write payload ``spec`` for ``dst`` so that sending it copies nothing (``None``: any buffer)."""
        return self.transport(dst).outgoing(spec)

    def post(self, message: Message, dst: int, payloads: Mapping[str, torch.Tensor] | None = None) -> Pending:
        """Start sending ``message`` and the payloads it announces to rank ``dst``; wait on the result.

        A payload the pair shares memory for is copied there first, unless it already is there (then nothing
        is copied); the header goes out after it, so the peer finds it complete.
        """
        specs = message.payloads()
        names = {spec.name for spec in specs}
        # An empty payload is announced by a zero size, so it is not sent at all.
        given = {n: t for n, t in (payloads or {}).items() if n in names or t.numel()}
        if sorted(given) != sorted(names):
            raise ValueError(f"{type(message).__name__} announces {[s.name for s in specs]}, got {sorted(given)}.")
        header = message.encode()
        transport = self.transport(dst)
        works: list[dist.Work] = []
        tensors = [header]
        nbytes = header.numel() * header.element_size()
        later: list[torch.Tensor] = []
        for spec in specs:
            tensor = given[spec.name]
            if tensor.numel() != spec.numel or tensor.dtype != spec.dtype or not tensor.is_contiguous():
                raise ValueError(
                    f"{type(message).__name__} payload {spec.name!r} must be {spec.numel} contiguous {spec.dtype}, "
                    f"got {tensor.numel()} {tensor.dtype}."
                )
            nbytes += tensor.numel() * tensor.element_size()
            shared = transport.outgoing(spec)
            if shared is not None:
                if shared.data_ptr() != tensor.data_ptr():
                    shared.copy_(tensor)
            elif tensor.numel():
                later.append(tensor)
        works.append(self._start(self.group.send, header, dst, HEADER_TAG, "send to it", None))
        for tensor in later:
            works.append(self._start(self.group.send, tensor, dst, PAYLOAD_TAG, "send to it", None))
            tensors.append(tensor)
        return Pending(dst, works, tensors, nbytes)

    def send(
        self,
        message: Message,
        dst: int,
        payloads: Mapping[str, torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send ``message`` and the payloads it announces to rank ``dst`` and wait; return the bytes sent."""
        pending = self.post(message, dst, payloads)
        pending.wait(self._bound(timeout))
        return pending.nbytes

    def prepost(self, src: int, count: int) -> None:
        """Post ``count`` header receives from ``src`` now, so its next messages complete without waiting for us."""
        queue = self._posted.setdefault(src, deque())
        for _ in range(count):
            header = torch.empty(HEADER_FIELDS, dtype=torch.float64)
            queue.append((header, self._start(self.group.recv, header, src, HEADER_TAG, "receive from it", None)))

    def recv(
        self,
        src: int,
        timeout: float | None = None,
        into: Mapping[str, torch.Tensor] | Callable[[Message], Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[Message, dict[str, torch.Tensor], int]:
        """Receive one message and its payloads from rank ``src``; return them and the bytes received.

        A payload the pair shares memory for is the shared memory itself (valid until the peer writes it
        again). Any other is received into ``into[name]``, a flat buffer laid out as the peer's (the payload lands
        at its offset), when it has room and the payload's dtype; else into a new tensor. ``into`` may be a function
        of the decoded header that returns those buffers.
        """
        queue = self._posted.get(src)
        if queue:
            header, work = queue.popleft()
        else:
            header = torch.empty(HEADER_FIELDS, dtype=torch.float64)
            work = self._start(self.group.recv, header, src, HEADER_TAG, "receive from it", timeout)
        _wait(work, src, "receive from it", self._bound(timeout))
        received = header.numel() * header.element_size()
        message = Message.decode(header, src)
        buffers = into(message) if callable(into) else (into or {})
        transport = self.transport(src)
        payloads: dict[str, torch.Tensor] = {}
        for spec in message.payloads():
            shared = transport.incoming(spec)
            if shared is None:
                buffer = buffers.get(spec.name)
                if buffer is None or buffer.dtype != spec.dtype or spec.offset + spec.numel > buffer.numel():
                    buffer = torch.empty(spec.numel, dtype=spec.dtype)
                else:
                    buffer = buffer[spec.offset : spec.offset + spec.numel]
                self._transfer(self.group.recv, buffer, src, PAYLOAD_TAG, "receive from it", timeout)
                shared = buffer
            received += shared.numel() * shared.element_size()
            payloads[spec.name] = shared
        return message, payloads, received

    def exchange(self, tensor: torch.Tensor, peers: Sequence[int], timeout: float | None = None) -> list[torch.Tensor]:
        """Send ``tensor`` to every rank of ``peers`` and receive theirs (same size); return theirs, in order."""
        received = [torch.empty_like(tensor) for _ in peers]
        works = []
        for peer, out in zip(peers, received, strict=True):
            works.append((peer, self._start(self.group.recv, out, peer, PEER_TAG, "receive from it", timeout)))
        for peer in peers:
            self._transfer(self.group.send, tensor, peer, PEER_TAG, "send to it", timeout)
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

    def _transfer(
        self, op: Callable[..., dist.Work], tensor: torch.Tensor, peer: int, tag: int, what: str, timeout: float | None
    ) -> None:
        """One send or receive of ``tensor``, waited for (an empty tensor moves nothing)."""
        if tensor.numel():
            _wait(self._start(op, tensor, peer, tag, what, timeout), peer, what, self._bound(timeout))


_TCP = TcpTransport()


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


def connect_group(
    address: str, port: int, rank: int, world_size: int, prefix: str, timeout: float, card: HostCard
) -> tuple[Group, dict[int, HostCard]]:
    """Join the gloo group of workers and servers through the job's rendezvous store; return it and every card.

    The group is separate from Lightning's default (workers-only) group, so Lightning's collectives never involve
    the servers. Every member connects to the store as a client; rank 0's default group (or torchrun's agent)
    hosts it. Each member leaves its :class:`HostCard` in the store before joining, so that once the group
    exists every card is there. Joining waits up to ``timeout`` seconds for every member.
    """
    delta = datetime.timedelta(seconds=timeout)
    store = PrefixStore(prefix, TCPStore(address, port, is_master=False, timeout=delta))
    store.set(f"card/{rank}", card.to_json())
    # The gloo backend object itself: it sends and receives, and Lightning never sees it.
    group = cast(Group, ProcessGroupGloo(store, rank, world_size, delta))
    cards = {r: HostCard.from_json(store.get(f"card/{r}")) for r in range(world_size)}
    return group, cards


def open_link(group: Group, rank: int, timeout: float, cards: Mapping[int, HostCard], num_workers: int) -> Link:
    """This process's :class:`Link`, with a shared-memory transport for each worker-server pair that can have one.

    A worker gives one to each server whose probe region it can map; a server to each worker of its host (it
    learns from the worker's ``ATTACH`` whether that worker could map it, and until then it uses TCP).
    """
    link = Link(group, rank, timeout, cards)
    me = cards.get(rank)
    if me is None or not shared_memory_available():
        return link
    for peer, card in cards.items():
        if (rank < num_workers) == (peer < num_workers):
            continue  # two workers, or two servers: no bulk payloads between them
        possible = me.can_map_probe_of(card) if rank < num_workers else me.same_host(card)
        if possible:
            link.transports[peer] = SharedMemoryTransport()
    return link
