"""The worker's side of the protocol, for one fit: push gradients, get back an average or parameters.

The parameters of the worker's optimizer are laid end to end and cut into byte-balanced chunks over the servers
(:mod:`~lightning_patterns.strategies.parameter_server.partition`). Each step the worker copies its gradients of
a server's chunks into one host buffer, divided by the number of workers (as DDP's reducer divides before its
all-reduce), and pushes it with one presence flag per chunk when some parameter has no gradient (frozen, or unused
this step). Then:

- ``update_on="worker"`` (:meth:`WorkerClient.sum_gradients`): the server answers with the sum of the workers'
  pushes, the average gradient, which becomes each parameter's ``.grad`` (``None`` where no worker had one), and
  the worker's own optimizer steps on it.
- ``update_on="server"`` (:meth:`WorkerClient.step_on_servers`): the push also carries the param groups'
  hyperparameters when they changed and the clipping the step asks for; the server updates its chunks and answers
  with them. The worker's optimizer only holds the hyperparameters that schedulers change; its ``state`` stays
  empty.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.link import Link
from lightning_patterns.strategies.parameter_server.messages import (
    Abort,
    Ack,
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
    SetState,
    State,
    Sum,
    decode_json,
    dtype_code,
    encode_json,
    pack_tensors,
    unpack_tensors,
)
from lightning_patterns.strategies.parameter_server.optimizers import (
    HyperparameterLayout,
    describe_param_groups,
    elementwise_name,
)
from lightning_patterns.strategies.parameter_server.partition import Chunk, partition_parameters, server_loads
from lightning_patterns.strategies.parameter_server.placement import FitSpec
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

__all__ = ["WorkerClient"]


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
        # Only `update_on="server"` sends the optimizer: check it before anything travels.
        self.optimizer_name = elementwise_name(optimizer) if update_on == "server" else ""
        self.groups = describe_param_groups(optimizer) if update_on == "server" else []
        self.layout = HyperparameterLayout(self.groups)
        itemsizes = [p.element_size() for p in self.params]
        self.chunks = partition_parameters([p.numel() for p in self.params], itemsizes, num_servers, chunk_bytes)
        self.by_server: list[list[Chunk]] = [[c for c in self.chunks if c.server == s] for s in range(num_servers)]
        numels = [sum(c.numel for c in chunks) for chunks in self.by_server]
        # Host buffers per server, reused every step: gloo sends and receives from CPU memory.
        self.send_buffers = [torch.empty(n, dtype=self.dtype) for n in numels]
        self.buffers = [torch.empty(n, dtype=self.dtype) for n in numels]
        initial = self.layout.vector(optimizer.param_groups)
        self.sent_hyperparameters = [initial] * num_servers  # what each server holds
        self.versions = [0] * num_servers
        self.rounds = 0
        self.telemetry = ParameterServerTelemetry(
            num_servers=num_servers, partition_bytes=server_loads(self.chunks, itemsizes, num_servers)
        )
        self.initialized = False
        self.finished = False  # END or FAIL sent: the servers expect nothing more from this worker
        self._last_step_end = time.perf_counter()

    def server_rank(self, server: int) -> int:
        """Global rank of server ``server``."""
        return self.world_size + server

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
                )
                description = encode_json(spec.to_json())
                payloads = {"json": description}
                values_numel = 0
                if self.update_on == "server":
                    payloads["values"] = self._gather(server, grads=False)
                    values_numel = payloads["values"].numel()
                init = Init(description.numel(), values_numel, self.dtype_code if values_numel else 0)
                self.link.send(init, self.server_rank(server), payloads, timeout=self.timeout)
            for server in range(self.num_servers):
                self._expect(server, Ack)
        self.initialized = True

    def pull(self) -> None:
        """``"server"``: replace the local parameters with the servers' current ones."""
        for server in range(self.num_servers):
            self.link.send(Pull(), self.server_rank(server), timeout=self.timeout)
        for server in range(self.num_servers):
            self._receive_params(server)
        self._last_step_end = time.perf_counter()

    def pause(self) -> None:
        """Tell the servers not to expect pushes for a while (validation, checkpointing)."""
        for server in range(self.num_servers):
            self.link.send(Pause(), self.server_rank(server), timeout=self.timeout)

    def end(self) -> None:
        """Tell the servers this worker finished its fit."""
        if self.finished:
            return
        self.finished = True
        for server in range(self.num_servers):
            self.link.send(End(), self.server_rank(server), timeout=self.timeout)

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
                message, payloads, _ = self.link.recv(self.server_rank(server), timeout=timeout)
            except (PeerLostError, ProtocolError):
                continue
            if isinstance(message, Abort):
                return self._abort_reason(server, payloads)
        return None

    # -- one step ----------------------------------------------------------------------------------------------------
    def sum_gradients(self, loss: float) -> float:
        """``"worker"``: push gradients and loss; set ``.grad`` to the workers' average; return the mean loss."""
        start = time.perf_counter()
        pushed = self._push_all(loss=loss)
        pulled = [0] * self.num_servers
        mean_loss = loss
        for server in range(self.num_servers):
            message, payloads, pulled[server] = self._expect(server, Sum, into={"grad": self.buffers[server]})
            assert isinstance(message, Sum)
            mean_loss = message.loss
            mask = payloads["mask"].tolist() if "mask" in payloads else None
            self._scatter_grads(server, payloads["grad"], mask)
        self._record(start, pushed, pulled, staleness=0)
        return mean_loss

    def step_on_servers(self, clip_value: float, clip_norm: bool, check_finite: bool, skip: bool) -> bool:
        """``"server"``: push this worker's gradients for the servers to apply; pull the parameters back.

        Returns whether the servers skipped the step (inf/NaN in the averaged gradient, or ``skip``).
        """
        start = time.perf_counter()
        hyperparameters = self.layout.vector(self.optimizer.param_groups)
        flags = (PushFlags.CHECK_FINITE if check_finite else PushFlags.NONE) | (PushFlags.SKIP if skip else 0)
        pushed = self._push_all(flags=flags, clip=(clip_value, clip_norm), hyperparameters=hyperparameters)
        pulled = [0] * self.num_servers
        skipped = skip
        staleness = 0
        for server in range(self.num_servers):
            message, pulled[server] = self._receive_params(server)
            skipped = skipped or bool(message.flags & PushFlags.SKIP)
            staleness = max(staleness, message.staleness)
        self._record(start, pushed, pulled, staleness)
        return skipped

    def _push_all(
        self,
        loss: float = 0.0,
        flags: int = PushFlags.NONE,
        clip: tuple[float, bool] = (0.0, True),
        hyperparameters: torch.Tensor | None = None,
    ) -> list[int]:
        present = [p.grad is not None for p in self.params]
        pushed = [0] * self.num_servers
        for server, chunks in enumerate(self.by_server):
            grad = self._gather(server, grads=True)
            payloads = {"grad": grad}
            mask = [present[c.tensor] for c in chunks]
            if not all(mask):
                payloads["mask"] = torch.tensor(mask, dtype=torch.uint8)
            if hyperparameters is not None and not torch.equal(hyperparameters, self.sent_hyperparameters[server]):
                payloads["hyper"] = hyperparameters
                self.sent_hyperparameters[server] = hyperparameters
            message = Push(
                step=self.rounds,
                version=self.versions[server],
                numel=grad.numel(),
                dtype=self.dtype_code,
                mask_numel=payloads["mask"].numel() if "mask" in payloads else 0,
                hyper_numel=payloads["hyper"].numel() if "hyper" in payloads else 0,
                flags=int(flags),
                loss=loss,
                clip_value=clip[0],
                clip_norm=int(clip[1]),
            )
            pushed[server] = self.link.send(message, self.server_rank(server), payloads, timeout=self.timeout)
        self.rounds += 1
        return pushed

    def _record(self, start: float, pushed: list[int], pulled: list[int], staleness: int) -> None:
        end = time.perf_counter()
        self.telemetry.record_step(pushed, pulled, end - start, start - self._last_step_end, staleness)
        self._last_step_end = end

    def _gather(self, server: int, grads: bool) -> torch.Tensor:
        """Copy ``server``'s chunks of the gradients (divided by the workers) or of the parameters into its buffer.

        The buffer is reused: every send waits for completion before returning, so it is free again by the next call.
        """
        buffer = self.send_buffers[server]
        offset = 0
        with torch.no_grad():
            for c in self.by_server[server]:
                param = self.params[c.tensor]
                source = param.grad if grads else param.detach()
                piece = buffer[offset : offset + c.numel]
                if source is None:  # no gradient this step: the presence mask says so, the zeros add nothing
                    piece.zero_()
                else:
                    piece.copy_(source.reshape(-1)[c.start : c.stop])
                offset += c.numel
            if grads and self.world_size > 1:
                buffer.mul_(1.0 / self.world_size)
        return buffer

    def _scatter_grads(self, server: int, grad: torch.Tensor, mask: list[int] | None) -> None:
        offset = 0
        with torch.no_grad():
            for index, c in enumerate(self.by_server[server]):
                if mask is None or mask[index]:
                    param = self.params[c.tensor]
                    if param.grad is None:  # unused here, used by another worker: DDP gives it the average too
                        param.grad = torch.zeros_like(param)
                    param.grad.view(-1)[c.start : c.stop].copy_(grad[offset : offset + c.numel])
                offset += c.numel

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

    def _receive_params(self, server: int) -> tuple[Params, int]:
        message, payloads, received = self._expect(server, Params, into={"values": self.buffers[server]})
        assert isinstance(message, Params)
        self.versions[server] = message.version
        values = payloads["values"]
        offset = 0
        with torch.no_grad():
            for c in self.by_server[server]:
                self.params[c.tensor].view(-1)[c.start : c.stop].copy_(values[offset : offset + c.numel])
                offset += c.numel
        return message, received

    # -- optimizer state (``"server"``) -----------------------------------------------------------------------------
    def gather_state(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` as a single-process optimizer would have it, assembled from servers."""
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
