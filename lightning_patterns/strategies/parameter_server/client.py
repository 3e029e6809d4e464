"""The worker's side of the protocol, for one fit: push gradient buckets as backward makes them, apply the replies.

The parameters of the worker's optimizer are laid end to end and cut into byte-balanced chunks over the servers
(:mod:`~lightning_patterns.strategies.parameter_server.partition`), and each server's chunks into buckets
(:mod:`~lightning_patterns.strategies.parameter_server.buckets`). A *round* is one synchronization:

1. :meth:`WorkerClient.begin_round` opens it; from then on :meth:`WorkerClient.grad_ready` (called by a gradient
   hook as each parameter's gradient is accumulated) pushes every bucket whose gradients are all there, divided by
   the number of workers (as DDP's reducer divides before its all-reduce), in the order backward produces them.
   :meth:`WorkerClient.flush` pushes the rest, with one presence flag per chunk where a parameter has no gradient
   (frozen, or unused this step).
2. ``update_on="worker"`` (:meth:`WorkerClient.sum_gradients`): each server answers each bucket as soon as every
   worker pushed it, with the workers' average, which becomes each parameter's ``.grad`` (``None`` where no worker
   had one); the worker's own optimizer steps on it.
3. ``update_on="server"`` (:meth:`WorkerClient.commit`): the worker commits the round with the param groups'
   hyperparameters when they changed and the clipping and inf check the step asks for; each server then updates
   its buckets in the order the next forward needs them and answers each with its parameters. A bucket whose
   gradient changed after it was pushed (a hook, an unscale) is pushed again before the commit.

Pushes and replies travel through the pair's transport
(:mod:`~lightning_patterns.strategies.parameter_server.link`): written once into shared memory the server reads
in place, or sent over TCP from host buffers. Replies are received into host memory the same way and copied into
the model once (:mod:`~lightning_patterns.strategies.parameter_server.device`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.buckets import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_FIRST_BUCKET_BYTES,
    Bucket,
    plan_buckets,
)
from lightning_patterns.strategies.parameter_server.device import Copier, make_copier
from lightning_patterns.strategies.parameter_server.link import Link, Pending
from lightning_patterns.strategies.parameter_server.messages import (
    Abort,
    Ack,
    Attach,
    Commit,
    End,
    Fail,
    GetState,
    Init,
    Message,
    Params,
    Pause,
    ProtocolError,
    Pull,
    Push,
    PushFlags,
    Regions,
    SetState,
    State,
    Sum,
    decode_json,
    dtype_code,
    encode_json,
    pack_tensors,
    unpack_tensors,
)
from lightning_patterns.strategies.parameter_server.norms import BucketNorms, total_norms
from lightning_patterns.strategies.parameter_server.optimizers import (
    HyperparameterLayout,
    describe_param_groups,
    elementwise_name,
)
from lightning_patterns.strategies.parameter_server.overlap import PendingParameters
from lightning_patterns.strategies.parameter_server.partition import Chunk, partition_parameters, server_loads
from lightning_patterns.strategies.parameter_server.placement import FitSpec
from lightning_patterns.strategies.parameter_server.shm import Region
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

__all__ = ["WorkerClient"]

#: A tensor's gradient as a bucket push saw it: its identity and version (``None``: no gradient).
_Seen = tuple[int, int] | None


class WorkerClient:
    """Talks to the servers for one worker, in one fit.

    Args:
        link: this worker's end of the worker-and-server group.
        optimizer: the worker's optimizer, from ``configure_optimizers``.
        update_on: ``"worker"`` or ``"server"``.
        world_size: number of workers.
        num_servers: number of servers.
        sync: whether updates are synchronous rounds.
        max_staleness: the stale-synchronous bound of async mode.
        chunk_bytes: the most bytes per chunk (``None``: no limit).
        timeout: seconds any wait may take.
        transport: ``"auto"``, ``"shm"`` or ``"tcp"``: which pairs use shared memory (``"auto"``: those that can).
        bucket_bytes: the most bytes of a bucket (:func:`~.buckets.plan_buckets`).
        first_bucket_bytes: the most bytes of the bucket backward fills first.
    """

    def __init__(
        self,
        link: Link,
        optimizer: torch.optim.Optimizer,
        update_on: str,
        world_size: int,
        num_servers: int,
        sync: bool,
        max_staleness: int | None,
        chunk_bytes: int | None,
        timeout: float,
        transport: str = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        first_bucket_bytes: int = DEFAULT_FIRST_BUCKET_BYTES,
    ) -> None:
        self.link = link
        self.optimizer = optimizer
        self.update_on = update_on
        self.world_size = world_size
        self.num_servers = num_servers
        self.sync = sync
        self.max_staleness = max_staleness
        self.rank = link.rank
        self.timeout = timeout
        self.transport = transport
        self.params: list[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self.group_of: list[int] = [g for g, group in enumerate(optimizer.param_groups) for _ in group["params"]]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(
                "ParameterServerStrategy needs every optimized parameter to have one dtype, got "
                f"{sorted(map(str, dtypes))}. Convert the model to one dtype (for example `model.float()`) or use a "
                "precision plugin that does."
            )
        if any(not p.is_contiguous() for p in self.params):
            raise ValueError("ParameterServerStrategy needs contiguous parameters; call `.contiguous()` on them.")
        self.dtype = self.params[0].dtype
        self.dtype_code = dtype_code(self.dtype)
        self.device = self.params[0].device
        self.copier: Copier = make_copier(self.device)
        # Only `update_on="server"` sends the optimizer: check it before anything travels.
        self.optimizer_name = elementwise_name(optimizer) if update_on == "server" else ""
        self.groups = describe_param_groups(optimizer) if update_on == "server" else []
        self.layout = HyperparameterLayout(self.groups)
        itemsizes = [p.element_size() for p in self.params]
        self.chunks = partition_parameters([p.numel() for p in self.params], itemsizes, num_servers, chunk_bytes)
        self.by_server: list[list[Chunk]] = [[c for c in self.chunks if c.server == s] for s in range(num_servers)]
        self.buckets: list[list[Bucket]] = plan_buckets(self.by_server, itemsizes, bucket_bytes, first_bucket_bytes)
        # Where each chunk starts in its server's flat buffer.
        self.chunk_offsets: list[list[int]] = []
        for chunks in self.by_server:
            offsets, offset = [], 0
            for chunk in chunks:
                offsets.append(offset)
                offset += chunk.numel
            self.chunk_offsets.append(offsets)
        numels = [sum(c.numel for c in chunks) for chunks in self.by_server]
        self.numels = numels
        # Host memory per server: pushes are written to `staging`, replies read from `landing`. Private buffers
        # until `attach` maps the fit's shared regions of the servers on this host.
        self.staging = [self.copier.host_buffer(n, self.dtype) for n in numels]
        self.landing = [self.copier.host_buffer(n, self.dtype) for n in numels]
        self.regions: list[Region] = []
        # Buckets each tensor has chunks in: a bucket is ready once all of them have their gradient.
        self.buckets_of: list[list[tuple[int, int]]] = [[] for _ in self.params]
        for server, buckets in enumerate(self.buckets):
            for bucket in buckets:
                for tensor in bucket.tensors:
                    self.buckets_of[tensor].append((server, bucket.index))
        initial = self.layout.vector(optimizer.param_groups)
        self.sent_hyperparameters = [initial] * num_servers  # what each server holds
        self.versions = [0] * num_servers
        self.rounds = 0
        self.telemetry = ParameterServerTelemetry(
            num_servers=num_servers,
            partition_bytes=server_loads(self.chunks, itemsizes, num_servers),
            transports=["tcp"] * num_servers,
        )
        self.initialized = False
        self.finished = False  # END or FAIL sent: the servers expect nothing more from this worker
        # -- the open round
        self.round_open = False
        self.collecting = False  # gradient hooks push buckets as they become ready
        self.loss = 0.0
        self.missing: dict[tuple[int, int], int] = {}  # bucket -> tensors without their gradient yet
        self.pushed: dict[tuple[int, int], list[_Seen]] = {}  # bucket -> its tensors' gradients as pushed
        self.outstanding: list[set[int]] = [set() for _ in range(num_servers)]  # buckets each server owes
        self.owed: list[int] = [0] * len(self.params)  # buckets each tensor waits for
        self.sends: list[Pending] = []
        self.landed: dict[tuple[int, int], Any] = {}  # copier tickets of applied replies, by bucket
        # "server", sync: after a commit, reads of parameters whose bucket has not arrived wait for it.
        self.guard = PendingParameters(self.params, self._wait_for) if update_on == "server" and sync else None
        self.skipped = False
        self.staleness = 0
        self._mean_loss = 0.0
        #: Samples of this worker's gradient in the open round when the servers measure its norms (``0``: not).
        self.samples = 0
        self.norms: dict[tuple[int, int], BucketNorms] = {}  # the open round's, by (server, bucket)
        #: The gradient norms of the last round, summed over every bucket (``None``: not measured).
        self.last_norms: BucketNorms | None = None
        self._sender: _Sender | None = _Sender(self) if self.copier.asynchronous else None
        # -- telemetry of the open round
        self._depth = 0
        self._exposed = 0.0
        self._first_push: float | None = None
        self._pushed_bytes = [0] * num_servers
        self._pulled_bytes = [0] * num_servers
        self._last_round_end = time.perf_counter()

    def server_rank(self, server: int) -> int:
        """Global rank of server ``server``."""
        return self.world_size + server

    @property
    def shared_servers(self) -> list[int]:
        """Servers whose buffers this worker reads and writes in shared memory this fit."""
        return [s for s in range(self.num_servers) if self._shares_memory(s)]

    def _shares_memory(self, server: int) -> bool:
        transport = self.link.shared_memory(self.server_rank(server))
        return transport is not None and transport.attached

    # -- start and stop ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Rank 0 describes the fit to every server (with its chunks' values for ``"server"``) and waits for each."""
        if self.rank == 0:
            for server, chunks in enumerate(self.by_server):
                spec = FitSpec(
                    placement=self.update_on,
                    sync=self.sync,
                    max_staleness=self.max_staleness,
                    timeout=self.timeout,
                    dtype=self.dtype,
                    chunk_numels=[c.numel for c in chunks],
                    optimizer=self.optimizer_name,
                    groups=self.groups,
                    chunk_groups=[self.group_of[c.tensor] for c in chunks] if self.update_on == "server" else [],
                    hyperparameters=self.layout.to_json(),
                    buckets=[b.numel for b in self.buckets[server]],
                )
                description = encode_json(spec.to_json())
                payloads = {"json": description}
                values_numel = 0
                if self.update_on == "server":
                    payloads["values"] = self._gather_values(server)
                    values_numel = payloads["values"].numel()
                init = Init(description.numel(), values_numel, self.dtype_code if values_numel else 0)
                self.link.send(init, self.server_rank(server), payloads, timeout=self.timeout)
            for server in range(self.num_servers):
                self._expect(server, Ack)
        self.initialized = True

    def attach(self) -> None:
        """Map the fit's shared regions of every server this worker shares memory with (after every ``INIT``)."""
        for server in range(self.num_servers):
            transport = self.link.shared_memory(self.server_rank(server))
            if transport is None or self.transport == "tcp":
                continue
            self.link.send(Attach(), self.server_rank(server), timeout=self.timeout)
            _, payloads, _ = self._expect(server, Regions)
            what = f"REGIONS from rank {self.server_rank(server)}"
            described = decode_json(payloads["json"], what) if "json" in payloads else {}
            try:
                push, pull = Region.open(described["push"]), Region.open(described["pull"])
            except (KeyError, TypeError) as error:
                raise ProtocolError(f"{what} does not describe a push and a pull region ({error!r}).") from None
            self.regions += [push, pull]
            numel = self.numels[server]
            if push.nbytes < numel * self.staging[server].element_size() or pull.nbytes < push.nbytes:
                raise ProtocolError(f"{what} describes regions too small for {numel} elements.")
            if self.device.type == "cuda":
                push.pin()
                pull.pin()
            self.staging[server] = push.tensor(self.dtype, numel)
            self.landing[server] = pull.tensor(self.dtype, numel)
            outgoing = {"grad": self.staging[server]}
            incoming = {"grad": self.landing[server], "values": self.landing[server]}
            transport.attach(outgoing=outgoing, incoming=incoming)
        self.telemetry.transports = ["shm" if self._shares_memory(s) else "tcp" for s in range(self.num_servers)]

    def detach(self) -> None:
        """Unmap the fit's shared regions (the fit is over)."""
        for server in range(self.num_servers):
            transport = self.link.shared_memory(self.server_rank(server))
            if transport is not None:
                transport.detach()
        for region in self.regions:
            region.release()
        self.regions = []
        self.staging = [self.copier.host_buffer(0, self.dtype) for _ in self.numels]
        self.landing = [self.copier.host_buffer(0, self.dtype) for _ in self.numels]

    def pull(self) -> None:
        """``"server"``: replace the local parameters with the servers' current ones."""
        self.settle()
        for server in range(self.num_servers):
            self.link.send(Pull(), self.server_rank(server), timeout=self.timeout)
            self._owe(server)
        self._await_replies()
        self._last_round_end = time.perf_counter()

    def pause(self) -> None:
        """Tell the servers not to expect pushes for a while (validation, checkpointing)."""
        self.settle()
        for server in range(self.num_servers):
            self.link.send(Pause(), self.server_rank(server), timeout=self.timeout)

    def end(self) -> None:
        """Tell the servers this worker finished its fit."""
        if self.finished:
            return
        self.settle()
        self.finished = True
        for server in range(self.num_servers):
            self.link.send(End(), self.server_rank(server), timeout=self.timeout)
        self.close()

    def close(self) -> None:
        """Stop the sender thread and unmap shared memory (after the fit)."""
        if self.guard is not None:
            self.guard.pending = {}
            self.guard.disarm()
        if self._sender is not None:
            self._sender.stop()
            self._sender = None
        self.detach()

    def fail(self, error: BaseException, timeout: float) -> None:
        """Tell the servers this worker failed and why (best effort: a lost server is skipped)."""
        if self.finished:
            return
        self.finished = True
        reason = encode_json({"error": f"{type(error).__name__}: {error}"})
        for server in range(self.num_servers):
            try:
                self.link.send(Fail(reason.numel()), self.server_rank(server), {"json": reason}, timeout=timeout)
            except PeerLostError:
                continue

    def probe_abort(self, timeout: float) -> str | None:
        """After a workers' collective failed: the reason a server gives for stopping the job, if one does."""
        for server in range(self.num_servers):
            try:
                while True:
                    message, payloads, _ = self.link.recv(self.server_rank(server), timeout=timeout)
                    if isinstance(message, Abort):
                        return self._abort_reason(server, payloads)
                    if not isinstance(message, (Sum, Params)):
                        break
            except (PeerLostError, ProtocolError):
                continue
        return None

    # -- one round ---------------------------------------------------------------------------------------------------
    def begin_round(self, loss: float = 0.0, collect: bool = True, samples: int = 0) -> None:
        """Open a round (before its backward); with ``collect``, :meth:`grad_ready` pushes buckets as they fill.

        The previous round's replies are all applied first: this worker's host buffers are then free to write,
        and the servers have read everything this worker pushed. ``samples > 0`` asks the servers to measure the
        round's gradient norms (:mod:`~lightning_patterns.strategies.parameter_server.norms`), this worker's
        gradient being a mean over ``samples`` samples.
        """
        self.settle()
        self.samples = samples
        if self.round_open:
            # A backward whose round was not committed (the closure ran twice): push its buckets again.
            self.collecting = collect
            self.missing = {key: len(self.buckets[key[0]][key[1]].tensors) for key in self._all_buckets()}
            self.loss = loss
            return
        self.round_open = True
        self.collecting = collect
        self.loss = loss
        self.norms = {}
        self.last_norms = None
        self.skipped = False
        self.staleness = 0
        self.missing = {key: len(self.buckets[key[0]][key[1]].tensors) for key in self._all_buckets()}
        self.pushed = {}
        if self.update_on == "worker":
            for server in range(self.num_servers):
                self._owe(server)

    def grad_ready(self, tensor: int) -> None:
        """The gradient of parameter ``tensor`` is accumulated: push every bucket it completes."""
        if not self.collecting:
            return
        with self._exposure():
            for key in self.buckets_of[tensor]:
                left = self.missing.get(key)
                if left is None:
                    continue
                if left > 1:
                    self.missing[key] = left - 1
                    continue
                del self.missing[key]
                self._push(*key)

    def end_backward(self) -> None:
        """Backward is over: push what it left (while gradients are as backward made them); hooks push no more."""
        if self.collecting:
            self.flush()
        self.collecting = False

    def flush(self) -> None:
        """Push every bucket of the open round not pushed yet (a parameter without a gradient is flagged absent)."""
        if not self.round_open:
            self.begin_round(collect=False)
        self.collecting = False
        with self._exposure():
            for key in self._all_buckets():
                if key not in self.pushed:
                    self._push(*key)
            self.missing = {}
            if self._sender is not None:
                self.sends += self._sender.drain(self.timeout)

    def sum_gradients(self, loss: float) -> float:
        """``"worker"``: finish the round: push what is left; set ``.grad`` to the workers' average; the mean loss."""
        if not self.round_open:
            self.begin_round(loss, collect=False)
        self.flush()
        self._await_replies()
        return self.mean_loss

    def commit(
        self, clip_value: float, clip_norm: bool, check_finite: bool, skip: bool, unscale: float = 1.0, bumps: int = 0
    ) -> None:
        """``"server"``: make the round's pushes final and ask the servers to apply them.

        Args:
            clip_value: clipping the servers apply to the averaged gradient (``0``: none).
            clip_norm: clip by the norm over all servers' chunks (else each value).
            check_finite: skip the step on every server if the averaged gradient has inf or NaN.
            skip: (async) do not apply this push.
            unscale: the servers multiply the averaged gradient by this first (a GradScaler's inverse scale).
            bumps: in-place changes this worker made to each gradient since backward on purpose (an unscale), which
                do not call for pushing it again.
        """
        self.flush()
        self.skipped = skip
        with self._exposure():
            for key, seen in self.pushed.items():
                expected = [None if s is None else (s[0], s[1] + bumps) for s in seen]
                if self._seen(key) != expected:
                    self._push(*key)  # changed after its push (a hook): push it again
            if self._sender is not None:
                self.sends += self._sender.drain(self.timeout)
            hyperparameters = self.layout.vector(self.optimizer.param_groups)
            flags = (PushFlags.CHECK_FINITE if check_finite else PushFlags.NONE) | (
                PushFlags.SKIP if skip else PushFlags.NONE
            )
            for server in range(self.num_servers):
                payloads = {}
                if not torch.equal(hyperparameters, self.sent_hyperparameters[server]):
                    payloads["hyper"] = hyperparameters
                    self.sent_hyperparameters[server] = hyperparameters
                message = Commit(
                    step=self.rounds,
                    flags=int(flags),
                    hyper_numel=hyperparameters.numel() if payloads else 0,
                    clip_value=clip_value,
                    clip_norm=int(clip_norm),
                    unscale=unscale,
                )
                self._post(server, message, payloads)
                self._owe(server)

    def step_on_servers(self, clip_value: float, clip_norm: bool, check_finite: bool, skip: bool) -> bool:
        """``"server"``: push this worker's gradients for the servers to apply; pull the parameters back.

        Returns whether the servers skipped the step (inf/NaN in the averaged gradient, or ``skip``).
        """
        self.commit(clip_value, clip_norm, check_finite, skip)
        self._await_replies()
        return self.skipped

    @property
    def mean_loss(self) -> float:
        """``"worker"``: the workers' mean loss of the last round."""
        return self._mean_loss

    def defer(self) -> None:
        """``"server"``, sync, after :meth:`commit`: go on; a read of a parameter waits for its own bucket.

        Until :meth:`settle`, the replies are received and applied as the code that runs next reads parameters
        (:class:`~lightning_patterns.strategies.parameter_server.overlap.PendingParameters`).
        """
        if self.guard is None:
            self.settle()
            return
        self.guard.arm(t for t, owed in enumerate(self.owed) if owed)

    def settle(self) -> None:
        """Apply every reply the servers owe this worker (the model is then the servers' latest)."""
        guard = self.guard
        if guard is not None:
            guard.bypass = True
        try:
            if any(self.outstanding):
                self._await_replies()
        finally:
            if guard is not None:
                guard.bypass = False
                guard.disarm()

    # -- pushes ------------------------------------------------------------------------------------------------------
    def _all_buckets(self) -> Iterator[tuple[int, int]]:
        # Backward's order: the last server's last bucket first.
        for server in reversed(range(self.num_servers)):
            for bucket in reversed(self.buckets[server]):
                yield server, bucket.index

    def _seen(self, key: tuple[int, int]) -> list[_Seen]:
        bucket = self.buckets[key[0]][key[1]]
        grads = [self.params[t].grad for t in bucket.tensors]
        return [None if g is None else (id(g), g._version) for g in grads]

    def _push(self, server: int, index: int) -> None:
        """Copy bucket ``index`` of ``server``'s gradients to host memory and push it."""
        bucket = self.buckets[server][index]
        chunks = self.by_server[server]
        offsets = self.chunk_offsets[server]
        buffer = self.staging[server]
        pieces = []
        present = []
        for position in bucket.chunks:
            chunk = chunks[position]
            grad = self.params[chunk.tensor].grad
            destination = buffer[offsets[position] : offsets[position] + chunk.numel]
            present.append(grad is not None)
            if grad is None:  # no gradient this step: the presence mask says so, the zeros add nothing
                destination.zero_()
            else:
                pieces.append((grad.reshape(-1)[chunk.start : chunk.stop], destination))
        replace = (server, index) in self.pushed
        self.pushed[(server, index)] = self._seen((server, index))
        # The CPU divides in the copy; a device keeps its copy a plain one and lets the server divide.
        divide_here = not self.copier.asynchronous or self.world_size == 1
        ticket = self.copier.to_host(pieces, 1.0 / self.world_size if divide_here else 1.0)
        payloads = {"grad": buffer[bucket.offset : bucket.offset + bucket.numel]}
        if not all(present):
            payloads["mask"] = torch.tensor(present, dtype=torch.uint8)
        message = Push(
            step=self.rounds,
            version=self.versions[server],
            bucket=index,
            offset=bucket.offset,
            numel=bucket.numel,
            dtype=self.dtype_code,
            mask_numel=payloads["mask"].numel() if "mask" in payloads else 0,
            flags=int(PushFlags.REPLACE if replace else PushFlags.NONE),
            loss=self.loss,
            scaled=int(divide_here),
            samples=self.samples,
        )
        if self._first_push is None:
            self._first_push = time.perf_counter()
        if self._sender is not None:
            self._sender.submit(ticket, server, message, payloads)
        else:
            self._post(server, message, payloads)

    def _post(self, server: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        pending = self.link.post(message, self.server_rank(server), payloads)
        self._pushed_bytes[server] += pending.nbytes
        self.sends.append(pending)

    # -- replies -----------------------------------------------------------------------------------------------------
    def _owe(self, server: int) -> None:
        """Server ``server`` owes one reply per bucket: post their receives now, so its sends complete at once."""
        self.outstanding[server] = {b.index for b in self.buckets[server]}
        for bucket in self.buckets[server]:
            for tensor in bucket.tensors:
                self.owed[tensor] += 1
        self.link.prepost(self.server_rank(server), len(self.buckets[server]))

    def _await_replies(self) -> None:
        """Receive and apply every reply the servers owe; close the round."""
        with self._exposure():
            for server in range(self.num_servers):
                while self.outstanding[server]:
                    self._receive_reply(server)
            self._all_arrived()

    def _wait_for(self, tensor: int) -> None:
        """Return once parameter ``tensor`` holds the servers' new values (its buckets applied, in device order)."""
        with self._exposure():
            for server, index in self.buckets_of[tensor]:
                while index in self.outstanding[server]:
                    self._receive_reply(server)
                ticket = self.landed.get((server, index))
                if ticket is not None:
                    self.copier.order_after(ticket)
            if not any(self.outstanding):
                self._all_arrived()

    def _all_arrived(self) -> None:
        """Every reply is applied: order the device after the copies, reclaim the sends, close the round."""
        for ticket in self.landed.values():
            self.copier.order_after(ticket)
        self.landed = {}
        sends, self.sends = self.sends, []
        for pending in sends:
            pending.wait(self.timeout)
        self._close_round()

    def _receive_reply(self, server: int) -> int:
        """Receive one bucket's reply from ``server`` and apply it to the model; return the bucket."""
        into = {"grad": self.landing[server], "values": self.landing[server]}
        kind = Sum if self.update_on == "worker" else Params
        message, payloads, received = self._expect(server, kind, into=into)
        self._pulled_bytes[server] += received
        assert isinstance(message, (Sum, Params))
        if message.bucket not in self.outstanding[server]:
            raise ProtocolError(
                f"Server rank {self.server_rank(server)} answered bucket {message.bucket}, which it does not owe "
                f"worker rank {self.rank}."
            )
        self.outstanding[server].discard(message.bucket)
        bucket = self.buckets[server][message.bucket]
        if message.inverse_batch > 0:
            self.norms[(server, message.bucket)] = BucketNorms(
                message.small_sqr, message.big_sqr, message.inverse_batch
            )
        if isinstance(message, Sum):
            self._mean_loss = message.loss
            ticket = self._apply_sum(server, bucket, payloads["grad"], payloads.get("mask"))
        else:
            self.versions[server] = max(self.versions[server], message.version)
            self.skipped = self.skipped or bool(message.flags & PushFlags.SKIP)
            self.staleness = max(self.staleness, message.staleness)
            ticket = self._apply_params(server, bucket, payloads["values"])
        self.landed[(server, message.bucket)] = ticket
        for tensor in bucket.tensors:
            self.owed[tensor] -= 1
            if not self.owed[tensor] and self.guard is not None:
                self.guard.arrived(tensor)
        return message.bucket

    def _apply_sum(self, server: int, bucket: Bucket, grad: torch.Tensor, mask: torch.Tensor | None) -> Any:
        present = mask.tolist() if mask is not None else None
        pieces = []
        for index, position in enumerate(bucket.chunks):
            if present is not None and not present[index]:
                continue  # no worker had a gradient: `.grad` stays as it is (None)
            chunk = self.by_server[server][position]
            param = self.params[chunk.tensor]
            if param.grad is None:  # unused here, used by another worker: DDP gives it the average too
                param.grad = torch.zeros_like(param)
            elif not param.grad.is_contiguous():
                param.grad = param.grad.contiguous()
            start = self.chunk_offsets[server][position] - bucket.offset
            pieces.append((grad[start : start + chunk.numel], param.grad.view(-1)[chunk.start : chunk.stop]))
        return self.copier.to_device(pieces)

    def _apply_params(self, server: int, bucket: Bucket, values: torch.Tensor) -> Any:
        pieces = []
        for position in bucket.chunks:
            chunk = self.by_server[server][position]
            start = self.chunk_offsets[server][position] - bucket.offset
            param = self.params[chunk.tensor].detach()
            pieces.append((values[start : start + chunk.numel], param.view(-1)[chunk.start : chunk.stop]))
        return self.copier.to_device(pieces)

    def _close_round(self) -> None:
        if not self.round_open:
            return
        self.round_open = False
        self.collecting = False
        self.rounds += 1
        if self.samples > 0:
            self.last_norms = total_norms(self.norms, sum(len(buckets) for buckets in self.buckets))
        self.norms = {}
        end = time.perf_counter()
        span = end - (self._first_push if self._first_push is not None else end)
        self.telemetry.record_step(
            pushed=self._pushed_bytes,
            pulled=self._pulled_bytes,
            exposed_seconds=self._exposed,
            overlapped_seconds=max(span - self._exposed, 0.0),
            step_seconds=end - self._last_round_end,
            staleness=self.staleness,
        )
        self._last_round_end = end
        self._exposed = 0.0
        self._first_push = None
        self._pushed_bytes = [0] * self.num_servers
        self._pulled_bytes = [0] * self.num_servers

    @contextmanager
    def _exposure(self) -> Iterator[None]:
        """Count the time inside as this worker's exposed communication (nested uses count once)."""
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._exposed += time.perf_counter() - start

    def _gather_values(self, server: int) -> torch.Tensor:
        """``server``'s chunks of the parameters, in host memory (sent in ``INIT``)."""
        buffer = torch.empty(self.numels[server], dtype=self.dtype)
        with torch.no_grad():
            for position, chunk in enumerate(self.by_server[server]):
                offset = self.chunk_offsets[server][position]
                source = self.params[chunk.tensor].detach().reshape(-1)[chunk.start : chunk.stop]
                buffer[offset : offset + chunk.numel].copy_(source)
        return buffer

    def _abort_reason(self, server: int, payloads: dict[str, torch.Tensor]) -> str:
        what = f"ABORT from server rank {self.server_rank(server)}"
        reason = decode_json(payloads["json"], what) if "json" in payloads else {}
        return str(reason.get("error", "no reason given")) if isinstance(reason, dict) else str(reason)

    def _expect(
        self, server: int, kind: type[Message], into: dict[str, torch.Tensor] | None = None
    ) -> tuple[Message, dict[str, torch.Tensor], int]:
        src = self.server_rank(server)
        message, payloads, received = self.link.recv(src, timeout=self.timeout, into=into)
        if isinstance(message, Abort):
            self.finished = True
            culprit = f" because rank {message.lost} failed or was lost" if message.lost >= 0 else ""
            raise PeerFailedError(
                f"Worker rank {self.rank}: server rank {src} stopped the job{culprit}: "
                f"{self._abort_reason(server, payloads)}"
            )
        if not isinstance(message, kind):
            raise ProtocolError(
                f"Worker rank {self.rank} expected {kind.__name__} from rank {src}, got {type(message).__name__}."
            )
        return message, payloads, received

    # -- optimizer state (``"server"``) -----------------------------------------------------------------------------
    def gather_state(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` as a single-process optimizer would have it, assembled from servers."""
        self.settle()
        state: dict[int, dict[str, Any]] = {}
        for server, chunks in enumerate(self.by_server):
            self.link.send(GetState(), self.server_rank(server), timeout=self.timeout)
            _, payloads, _ = self._expect(server, State)
            what = f"STATE from rank {self.server_rank(server)}"
            described = decode_json(payloads["json"], what) if "json" in payloads else []
            entries = unpack_tensors(described, payloads.get("data", torch.empty(0, dtype=torch.uint8)), what)
            for c, chunk_state in zip(chunks, entries, strict=True):
                if not chunk_state:  # never stepped (no gradient yet): no state, as in torch.optim
                    continue
                param = self.params[c.tensor]
                full = state.setdefault(c.tensor, {})
                for key, value in chunk_state.items():
                    if isinstance(value, torch.Tensor) and value.dim() >= 1:
                        if key not in full:
                            full[key] = torch.zeros(param.numel(), dtype=value.dtype)
                        full[key][c.start : c.stop] = value
                    else:
                        full[key] = value
        for index, full in state.items():
            shape = self.params[index].shape
            for key, value in full.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1:
                    full[key] = value.reshape(shape)
        state_dict = self.optimizer.state_dict()
        state_dict["state"] = dict(sorted(state.items()))
        return state_dict

    def load_state(self, state_dict: dict[str, Any]) -> None:
        """Split a single-process optimizer ``state_dict`` over the servers (any number of them)."""
        state = state_dict["state"]
        for server, chunks in enumerate(self.by_server):
            per_chunk = []
            for c in chunks:
                full = state.get(c.tensor, {})
                per_chunk.append(
                    {
                        key: value.reshape(-1)[c.start : c.stop]
                        if isinstance(value, torch.Tensor) and value.dim() >= 1
                        else value
                        for key, value in full.items()
                    }
                )
            described, data = pack_tensors(per_chunk)
            description = encode_json(described)
            message = SetState(description.numel(), data.numel())
            self.link.send(message, self.server_rank(server), {"json": description, "data": data}, timeout=self.timeout)
            self._expect(server, Ack)


class _Sender:
    """Announces the pushes of a device worker once their copies reached host memory, off the backward thread.

    Gradient hooks run on the autograd engine's device thread: waiting there for a copy would stall backward. The
    hook queues the push; this thread waits for the copy's event and posts the message. Its failures are raised
    on the worker's thread at the next :meth:`drain`.
    """

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.queue: queue.Queue[tuple[Any, int, Message, dict[str, torch.Tensor]] | None] = queue.Queue()
        self.posted: list[Pending] = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="ps-push")
        self.thread.start()

    def submit(self, ticket: Any, server: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        """Post ``message`` to ``server`` once the copies of ``ticket`` are done."""
        self.queue.put((ticket, server, message, payloads))

    def drain(self, timeout: float) -> list[Pending]:
        """Wait until every submitted push is posted; return their sends (raises the thread's failure, if any)."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.0005)
        if self.error is not None:
            raise self.error
        if self.queue.unfinished_tasks:
            raise PeerLostError(f"Worker rank {self.client.rank}: pushes not posted within timeout={timeout}s.")
        with self.lock:
            posted, self.posted = self.posted, []
        return posted

    def stop(self) -> None:
        """End the thread."""
        self.queue.put(None)
        self.thread.join(5.0)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                ticket, server, message, payloads = item
                if self.error is None:
                    self.client.copier.wait_host(ticket)
                    pending = self.client.link.post(message, self.client.server_rank(server), payloads)
                    with self.lock:
                        self.client._pushed_bytes[server] += pending.nbytes
                        self.posted.append(pending)
            except BaseException as error:  # raised on the worker's thread by `drain`
                self.error = error
            finally:
                self.queue.task_done()
