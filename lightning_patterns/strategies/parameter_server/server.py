"""The server process: holds a partition of the parameters and runs the optimizer on it.

Each server starts one receiver thread per worker. A thread blocks on a receive from its worker only (so
a dead worker fails it at once) and hands complete messages to the main loop through a queue; the main
loop applies them in arrival order, which is what asynchronous training needs, and bounds every wait for
a worker it expects to hear from by ``timeout``. Set ``LP_PS_DEBUG=1`` to log every message a server handles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.messages import (
    Header,
    Kind,
    P2PGroup,
    connect_group,
    recv_header,
    recv_object,
    recv_tensor,
    send_header,
    send_object,
    send_tensor,
)

__all__ = ["ServerConfig", "run_server"]

log = logging.getLogger(__name__)

#: Bound on waits for a peer that is not expected to talk (all workers validating, say). A peer that dies
#: meanwhile is still noticed at once, because every receive names its source.
IDLE_BOUND_S = 24 * 3600.0
#: Bound on joining the process groups: every process must have started (imports, spawning) by then.
JOIN_TIMEOUT_S = 120.0


def join_timeout(timeout: float) -> float:
    """Bound on joining the process groups (and on barriers): ``timeout``, but at least ``JOIN_TIMEOUT_S``."""
    return max(timeout, JOIN_TIMEOUT_S)


def is_sync(mode: str, max_staleness: int | None) -> bool:
    """Whether servers apply synchronous rounds: ``mode="sync"``, or ``"async"`` with ``max_staleness=0``."""
    return mode == "sync" or max_staleness == 0


@dataclass(frozen=True)
class ServerConfig:
    """What a server process needs to join the job; pickled into the spawned process.

    Attributes:
        server_index: index of this server, 0-based; its global rank is ``num_workers + server_index``.
        num_workers: number of workers (global ranks ``0 .. num_workers - 1``).
        num_servers: number of servers.
        main_address: address of the rendezvous store.
        main_port: port of the rendezvous store.
        prefix: store prefix of this job's worker-and-server group.
        timeout: seconds a worker the server waits for may stay silent.
        mode: ``"sync"`` or ``"async"``.
        max_staleness: staleness bound for ``"async"``; ``None`` for none.
    """

    server_index: int
    num_workers: int
    num_servers: int
    main_address: str
    main_port: int
    prefix: str
    timeout: float
    mode: str
    max_staleness: int | None

    @property
    def rank(self) -> int:
        """Global rank of this server."""
        return self.num_workers + self.server_index


def run_server(config: ServerConfig) -> None:
    """Entry point of a server process: join the process group, serve, exit non-zero on a lost peer."""
    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("LP_PS_DEBUG") else logging.INFO,
        format=f"[server rank {config.rank}] %(levelname)s %(message)s",
    )
    world_size = config.num_workers + config.num_servers
    pg = connect_group(
        config.main_address,
        config.main_port,
        config.rank,
        world_size,
        config.prefix,
        join_timeout(config.timeout),
    )
    server = _ParameterServer(config, pg)
    try:
        server.serve()
    except PeerLostError as error:
        log.error("PeerLostError: %s", error)
        server.abort(error)
        sys.stdout.flush()
        os._exit(1)  # receiver threads may still block on a dead peer


class _ParameterServer:
    def __init__(self, config: ServerConfig, pg: P2PGroup) -> None:
        self.config = config
        self.pg = pg
        self.rank = config.rank
        self.timeout = config.timeout
        self.num_workers = config.num_workers
        self.num_groups = 0
        self.version = 0
        self.queue: queue.Queue[tuple[int, Header | None, Any]] = queue.Queue()
        self.done: set[int] = set()
        self.lost: int | None = None

    # -- setup -------------------------------------------------------------------------------------------
    def _init_from(self, spec: dict[str, Any]) -> None:
        self.num_groups = len(spec["groups"])
        self.chunks: list[tuple[int, int, int]] = spec["chunks"]  # (tensor, start, stop) in payload order
        self.flat: torch.Tensor = spec["values"].clone()
        self.grad = torch.zeros_like(self.flat)
        self.params: list[torch.Tensor] = []
        groups: list[dict[str, Any]] = [{**hp, "params": []} for hp in spec["groups"]]
        offset = 0
        for (_, start, stop), group in zip(self.chunks, spec["chunk_groups"], strict=True):
            n = stop - start
            # A detached view is a leaf that shares storage with `flat`: the optimizer updates `flat` in place.
            param = self.flat[offset : offset + n].detach().requires_grad_(True)
            param.grad = self.grad[offset : offset + n]
            groups[group]["params"].append(param)
            self.params.append(param)
            offset += n
        cls = spec["optimizer_class"]
        try:
            self.optimizer: torch.optim.Optimizer = cls(groups, **spec["defaults"])
        except TypeError:
            self.optimizer = cls(groups)
        self.clock = [0] * self.num_workers
        self.base_version = [0] * self.num_workers
        self.pushed: set[int] = set()
        self.pending: dict[int, int] = {}  # worker -> staleness of the push awaiting a reply
        self.active = [False] * self.num_workers
        self.last_seen = [time.monotonic()] * self.num_workers
        self.sync = is_sync(self.config.mode, self.config.max_staleness)
        log.info(
            "holding %d chunks (%d elements) with %s, mode=%s",
            len(self.chunks),
            self.flat.numel(),
            cls.__name__,
            "sync" if self.sync else f"async(max_staleness={self.config.max_staleness})",
        )

    # -- main loop ---------------------------------------------------------------------------------------
    def serve(self) -> None:
        header = recv_header(self.pg, 0, 0, IDLE_BOUND_S)
        if header.kind == Kind.SHUTDOWN:  # the workers stopped before training began
            self.done = set(range(self.num_workers))
            return
        if header.kind != Kind.INIT:
            raise RuntimeError(f"Server rank {self.rank} expected INIT from rank 0, got {header.kind.name}.")
        self._init_from(recv_object(self.pg, header, 0, self.timeout))
        for worker in range(self.num_workers):
            threading.Thread(target=self._receive, args=(worker,), daemon=True, name=f"ps-recv-{worker}").start()
        while len(self.done) < self.num_workers:
            worker, maybe_header, payload = self._next()
            if maybe_header is None:  # the receiver thread failed
                self.lost = worker
                raise payload
            self.last_seen[worker] = time.monotonic()
            self._handle(worker, maybe_header, payload)

    def _receive(self, worker: int) -> None:
        try:
            while True:
                header = recv_header(self.pg, worker, self.num_groups, IDLE_BOUND_S)
                payload: Any = None
                if header.kind == Kind.PUSH:
                    payload = torch.empty(header.numel, dtype=self.flat.dtype)
                    recv_tensor(self.pg, payload, worker, self.timeout)
                elif header.kind == Kind.SET_STATE:
                    payload = recv_object(self.pg, header, worker, self.timeout)
                self.queue.put((worker, header, payload))
                if header.kind == Kind.SHUTDOWN:
                    return
        except PeerLostError as error:
            if worker not in self.done:
                self.queue.put((worker, None, error))

    def _expected(self) -> list[int]:
        # Workers that owe us a message: training, not finished, and not waiting for our reply.
        return [
            w
            for w in range(self.num_workers)
            if self.active[w] and w not in self.done and w not in self.pushed and w not in self.pending
        ]

    def _next(self) -> tuple[int, Header | None, Any]:
        while True:
            expected = self._expected()
            now = time.monotonic()
            wait = min((self.last_seen[w] + self.timeout - now for w in expected), default=1.0)
            try:
                return self.queue.get(timeout=max(wait, 0.0) + 0.01)
            except queue.Empty:
                overdue = [w for w in self._expected() if time.monotonic() - self.last_seen[w] > self.timeout]
                if overdue:
                    self.lost = overdue[0]
                    raise PeerLostError(
                        f"Server rank {self.rank} lost worker rank {overdue[0]}: no message from it within "
                        f"timeout={self.timeout}s while training. If it is only slow, raise "
                        f"`ParameterServerStrategy(timeout=...)`."
                    ) from None

    def _handle(self, worker: int, header: Header, payload: Any) -> None:
        kind = header.kind
        log.debug("%s from rank %d (step %d)", kind.name, worker, header.step)
        if kind == Kind.PUSH:
            self.active[worker] = True
            self._push(worker, header, payload)
        elif kind == Kind.PULL:
            self._send_params(worker, staleness=0)
        elif kind == Kind.PAUSE:
            self.active[worker] = False
        elif kind == Kind.SHUTDOWN:
            self.done.add(worker)
            self.active[worker] = False
            self._maybe_finish_round()
            self._release()
        elif kind == Kind.GET_STATE:
            send_object(self.pg, Kind.STATE, self._state(), worker, self.num_groups, self.timeout)
        elif kind == Kind.SET_STATE:
            self._load_state(payload)
            send_header(self.pg, Header(Kind.ACK), worker, self.num_groups, self.timeout)
        else:
            raise RuntimeError(f"Server rank {self.rank} got an unexpected {kind.name} from rank {worker}.")

    # -- updates -----------------------------------------------------------------------------------------
    def _apply(self, lrs: tuple[float, ...]) -> None:
        # The gradient to apply is already in `self.grad`, whose slices are the parameters' `.grad`.
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1

    def _push(self, worker: int, header: Header, grad: torch.Tensor) -> None:
        self.clock[worker] += 1
        if self.sync:
            # The round's sum accumulates in `self.grad`; only the optimizer's step reads it.
            if not self.pushed:
                self.grad.copy_(grad)
            else:
                self.grad.add_(grad)
            self.pushed.add(worker)
            self.lrs = header.lrs
            self._maybe_finish_round()
            return
        staleness = self.version - header.version
        # One push is one update; dividing by the number of workers keeps SGD's step per round of pushes
        # equal to a synchronous step's.
        torch.div(grad, self.num_workers, out=self.grad)
        self._apply(header.lrs)
        self.pending[worker] = staleness
        self._release()

    def _maybe_finish_round(self) -> None:
        if not self.sync or not self.pushed:
            return
        if len(self.pushed) < self.num_workers - len(self.done - self.pushed):
            return
        self.grad.div_(len(self.pushed))
        self._apply(self.lrs)
        for worker in sorted(self.pushed):
            self._send_params(worker, staleness=0)
        self.pushed.clear()

    def _release(self) -> None:
        if not self.pending:
            return
        live = [self.clock[w] for w in range(self.num_workers) if w not in self.done]
        slowest = min(live, default=0)
        bound = self.config.max_staleness
        for worker in sorted(self.pending):
            if bound is None or self.clock[worker] - slowest <= bound:
                self._send_params(worker, self.pending.pop(worker))

    def _send_params(self, worker: int, staleness: int) -> None:
        # The worker was waiting for us; its silence until now was not its fault.
        self.last_seen[worker] = time.monotonic()
        header = Header(Kind.PARAMS, step=self.version, version=staleness, numel=self.flat.numel())
        send_header(self.pg, header, worker, self.num_groups, self.timeout)
        send_tensor(self.pg, self.flat, worker, self.timeout)

    # -- state -------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        states = []
        for param in self.params:
            state = self.optimizer.state.get(param, {})
            states.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        return {"state": states}

    def _load_state(self, spec: dict[str, Any]) -> None:
        for param, state in zip(self.params, spec["state"], strict=True):
            if state:
                self.optimizer.state[param] = {
                    k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
                }

    def abort(self, error: PeerLostError) -> None:
        """Tell every worker still reachable which rank was lost, so none waits for its timeout."""
        lost = self.lost if self.lost is not None else -1
        for worker in range(self.num_workers):
            if worker == lost or worker in self.done:
                continue
            with contextlib.suppress(PeerLostError):
                send_header(self.pg, Header(Kind.ABORT, lost=lost), worker, self.num_groups, min(self.timeout, 5.0))
