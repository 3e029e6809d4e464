"""The server: serves the fits of one job, one after another, until told to exit or a process fails.

Each server starts one receiver thread per worker. A thread blocks on a receive from its worker only (so a dead
worker fails it at once) and hands complete messages to the main loop through a queue; the main loop applies them
in arrival order, which is what asynchronous training needs, and bounds every wait for a worker it expects to
hear from by the fit's ``timeout``.

A fit starts with ``INIT`` from worker 0 (answered by ``ACK``) and ends when every worker has sent ``END``.
Between fits the server holds nothing and waits for the next ``INIT`` or for ``EXIT``. A worker that fails
sends ``FAIL``; a worker that dies is seen by its receiver thread; either way, during a fit, the server tells
every other worker why (``ABORT``) and exits non-zero. A worker that disconnects between fits ended the job.
Set ``LP_PS_DEBUG=1`` to log every message a server handles.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.link import Link
from lightning_patterns.strategies.parameter_server.messages import (
    Abort,
    Ack,
    End,
    Exit,
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
)
from lightning_patterns.strategies.parameter_server.placement import (
    PLACEMENTS,
    FitSpec,
    Placement,
    RoundInputs,
    ServerOptimizer,
)

__all__ = ["JOIN_TIMEOUT_S", "ParameterServer", "is_sync", "join_timeout"]

log = logging.getLogger(__name__)

#: Bound on waits for a peer that is not expected to talk (between fits, all workers validating). A peer that dies
#: meanwhile is still noticed at once, because every receive names its source.
IDLE_BOUND_S = 7 * 24 * 3600.0
#: Bound on joining the process groups: every process must have started (imports, spawning) by then.
JOIN_TIMEOUT_S = 120.0


def join_timeout(timeout: float) -> float:
    """Bound on joining the process groups (and on barriers): ``timeout``, but at least ``JOIN_TIMEOUT_S``."""
    return max(timeout, JOIN_TIMEOUT_S)


def is_sync(mode: str, max_staleness: int | None) -> bool:
    """Whether servers apply synchronous rounds: ``mode="sync"``, or ``"async"`` with ``max_staleness=0``."""
    return mode == "sync" or max_staleness == 0


class _Fit:
    """What a server keeps for the fit it serves: the placement's state and the round bookkeeping."""

    def __init__(self, spec: FitSpec, placement: Placement, num_workers: int) -> None:
        self.spec = spec
        self.placement = placement
        self.num_workers = num_workers
        self.present = torch.zeros(len(spec.chunk_numels), dtype=torch.int32)
        self.pushed: dict[int, Push] = {}  # sync: this round's pushes
        self.loss = 0.0  # sync: this round's summed losses
        initial = placement.initial_hyperparameters if isinstance(placement, ServerOptimizer) else None
        self.hyperparameters: list[torch.Tensor | None] = [initial] * num_workers  # each worker's latest
        self.clock = [0] * num_workers  # pushes per worker
        self.pending: dict[int, int] = {}  # async: worker -> staleness of the push awaiting its parameters
        self.active = [False] * num_workers
        self.last_seen = [time.monotonic()] * num_workers
        self.done: set[int] = set()
        self.rounds = 0

    def expected(self) -> list[int]:
        """Workers that owe the server a message: training, not finished, and not waiting for its reply."""
        return [
            w
            for w in range(self.num_workers)
            if self.active[w] and w not in self.done and w not in self.pushed and w not in self.pending
        ]


class ParameterServer:
    """One server process's protocol loop.

    Args:
        link: this server's end of the worker-and-server group.
        num_workers: workers in the job (global ranks ``0 .. num_workers - 1``).
        num_servers: servers in the job (global ranks ``num_workers ..``).
    """

    def __init__(self, link: Link, num_workers: int, num_servers: int) -> None:
        self.link = link
        self.rank = link.rank
        self.num_workers = num_workers
        self.peers = [num_workers + s for s in range(num_servers) if num_workers + s != link.rank]
        self.inbox: queue.Queue[tuple[int, Message | None, Any]] = queue.Queue()
        self.fit: _Fit | None = None
        # Messages of workers that ended the current fit, which belong to what follows it: handled once it ends.
        self.deferred: list[tuple[int, Message, dict[str, torch.Tensor]]] = []
        self.culprit: int | None = None  # the rank that failed or was lost, once known
        self.exiting = False
        self._receivers = [
            threading.Thread(target=self._receive, args=(w,), daemon=True, name=f"ps-recv-{w}")
            for w in range(num_workers)
        ]

    # -- main loop ---------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve fits until ``EXIT`` or until a worker disconnects between fits; raise when a fit fails."""
        for thread in self._receivers:
            thread.start()
        while not self.exiting:
            worker, message, payloads = self._next()
            if message is None:
                self._on_lost(worker, payloads)
                continue
            log.debug("%s from rank %d", type(message).__name__, worker)
            if self.fit is not None and worker in self.fit.done and not isinstance(message, Fail):
                self.deferred.append((worker, message, payloads))
                continue
            if self.fit is not None:
                self.fit.last_seen[worker] = time.monotonic()
            self._handle(worker, message, payloads)

    def _receive(self, worker: int) -> None:
        try:
            while True:
                message, payloads, _ = self.link.recv(worker, timeout=IDLE_BOUND_S)
                self.inbox.put((worker, message, payloads))
                if isinstance(message, Exit):
                    return
        except (PeerLostError, ProtocolError) as error:
            self.inbox.put((worker, None, error))

    def _next(self) -> tuple[int, Message | None, Any]:
        while True:
            fit = self.fit
            wait = 1.0
            if fit is not None:
                now = time.monotonic()
                wait = min((fit.last_seen[w] + fit.spec.timeout - now for w in fit.expected()), default=1.0)
            try:
                return self.inbox.get(timeout=max(wait, 0.0) + 0.01)
            except queue.Empty:
                if fit is None:
                    continue
                overdue = [w for w in fit.expected() if time.monotonic() - fit.last_seen[w] > fit.spec.timeout]
                if overdue:
                    self.culprit = overdue[0]
                    raise PeerLostError(
                        f"Server rank {self.rank} lost worker rank {overdue[0]}: no message from it within "
                        f"timeout={fit.spec.timeout}s while training. If it is only slow, raise "
                        "`ParameterServerStrategy(timeout=...)`."
                    ) from None

    def _on_lost(self, worker: int, error: BaseException) -> None:
        if isinstance(error, ProtocolError):
            self.culprit = worker
            raise error
        if self.fit is None:
            log.info("worker rank %d disconnected while no fit was running: the job is over; exiting", worker)
            self.exiting = True
        elif worker not in self.fit.done:
            self.culprit = worker
            raise error

    def _handle(self, worker: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        try:
            self._dispatch(worker, message, payloads)
        except ProtocolError:
            self.culprit = worker
            raise

    def _dispatch(self, worker: int, message: Message, payloads: dict[str, torch.Tensor]) -> None:
        if isinstance(message, Fail):
            self.culprit = worker
            reason = decode_json(payloads["json"], f"FAIL from rank {worker}") if "json" in payloads else {}
            raise PeerFailedError(f"Worker rank {worker} failed: {reason.get('error', 'no reason given')}")
        if isinstance(message, Init):
            self._init(worker, message, payloads)
            return
        if isinstance(message, Exit):
            if self.fit is not None:
                raise ProtocolError(f"Rank {worker} sent EXIT during a fit.")
            log.info("rank %d asked the server to exit", worker)
            self.exiting = True
            return
        fit = self.fit
        if fit is None:
            raise ProtocolError(f"Rank {worker} sent {message.kind.name} while no fit was running.")
        if isinstance(message, Push):
            self._push(fit, worker, message, payloads)
        elif isinstance(message, Pull) and isinstance(fit.placement, ServerOptimizer):
            self._send_params(fit, worker, staleness=0)
        elif isinstance(message, Pause):
            fit.active[worker] = False
        elif isinstance(message, End):
            self._end(fit, worker)
        elif isinstance(message, GetState) and isinstance(fit.placement, ServerOptimizer):
            described, data = fit.placement.state()
            reply = encode_json(described)
            self.link.send(State(reply.numel(), data.numel()), worker, {"json": reply, "data": data})
        elif isinstance(message, SetState) and isinstance(fit.placement, ServerOptimizer):
            described = decode_json(payloads["json"], f"SET_STATE from rank {worker}") if "json" in payloads else []
            fit.placement.load_state(described, payloads.get("data", torch.empty(0, dtype=torch.uint8)), worker)
            self.link.send(Ack(), worker)
        else:
            raise ProtocolError(
                f"Rank {worker} sent {message.kind.name}, which update_on={fit.spec.placement!r} does not use."
            )

    # -- fits --------------------------------------------------------------------------------------------------------
    def _init(self, worker: int, message: Init, payloads: dict[str, torch.Tensor]) -> None:
        if worker != 0:
            raise ProtocolError(f"Rank {worker} sent INIT; only worker rank 0 starts a fit.")
        if self.fit is not None:
            raise ProtocolError(f"Rank {worker} sent INIT during a fit.")
        spec = FitSpec.from_payload(payloads.get("json", torch.empty(0, dtype=torch.uint8)), worker)
        placement = PLACEMENTS.get(spec.placement)(spec, payloads.get("values"))
        self.fit = _Fit(spec, placement, self.num_workers)
        log.info(
            "serving a fit: %d chunks (%d elements), update_on=%r%s, %s",
            len(spec.chunk_numels),
            spec.numel,
            spec.placement,
            f" with {spec.optimizer}" if spec.optimizer else "",
            "sync" if spec.sync else f"async(max_staleness={spec.max_staleness})",
        )
        self.link.send(Ack(), worker, timeout=spec.timeout)

    def _end(self, fit: _Fit, worker: int) -> None:
        fit.done.add(worker)
        fit.active[worker] = False
        if fit.spec.sync and fit.pushed:
            raise RuntimeError(
                f"Worker rank {worker} ended its fit while ranks {sorted(fit.pushed)} wait in a synchronous step: the "
                "workers ran different numbers of optimizer steps (a different `max_steps`, or a stopping rule that "
                "is not decided on every rank alike)."
            )
        self._release(fit)
        if len(fit.done) < self.num_workers:
            return
        log.info("fit ended after %d updates", fit.rounds)
        self.fit = None
        deferred, self.deferred = self.deferred, []
        for sender, message, payloads in deferred:
            self._handle(sender, message, payloads)

    # -- updates -----------------------------------------------------------------------------------------------------
    def _push(self, fit: _Fit, worker: int, message: Push, payloads: dict[str, torch.Tensor]) -> None:
        grad, mask = payloads["grad"], payloads.get("mask")
        spec = fit.spec
        if grad.numel() != spec.numel or grad.dtype != spec.dtype:
            raise ProtocolError(
                f"Rank {worker} pushed {grad.numel()} {grad.dtype}; expected {spec.numel} {spec.dtype}."
            )
        if mask is not None and mask.numel() != len(spec.chunk_numels):
            raise ProtocolError(
                f"Rank {worker} pushed a mask of {mask.numel()} chunks; expected {len(spec.chunk_numels)}."
            )
        if "hyper" in payloads:
            layout = fit.placement.layout if isinstance(fit.placement, ServerOptimizer) else None
            if layout is None or payloads["hyper"].numel() != layout.numel:
                raise ProtocolError(f"Rank {worker} pushed hyperparameters this fit does not lay out.")
            fit.hyperparameters[worker] = payloads["hyper"]
        fit.active[worker] = True
        fit.clock[worker] += 1
        if spec.sync:
            self._add_to_round(fit, worker, message, grad, mask)
            return
        assert isinstance(fit.placement, ServerOptimizer)
        staleness = fit.placement.version - message.version
        if not message.flags & PushFlags.SKIP:
            present = mask != 0 if mask is not None else torch.ones(len(spec.chunk_numels), dtype=torch.bool)
            fit.placement.update(grad, RoundInputs(present, hyperparameters=fit.hyperparameters[worker]))
            fit.rounds += 1
        fit.pending[worker] = staleness
        self._release(fit)

    def _add_to_round(self, fit: _Fit, worker: int, message: Push, grad: torch.Tensor, mask: Any) -> None:
        if worker in fit.pushed:
            raise ProtocolError(f"Rank {worker} pushed twice in one synchronous round.")
        if fit.done:
            raise RuntimeError(
                f"Worker rank {worker} pushed step {message.step} after ranks {sorted(fit.done)} ended their fit: the "
                "workers ran different numbers of optimizer steps."
            )
        # Workers divide their gradients by the number of workers before pushing: the sum is the average.
        if not fit.pushed:
            fit.placement.grad.copy_(grad)
            fit.present.zero_()
            fit.loss = 0.0
        else:
            fit.placement.grad.add_(grad)
        fit.present += 1 if mask is None else mask.to(torch.int32)
        fit.loss += message.loss
        fit.pushed[worker] = message
        if len(fit.pushed) == self.num_workers:
            self._finish_round(fit)

    def _finish_round(self, fit: _Fit) -> None:
        ranks = sorted(fit.pushed)
        first = fit.pushed[ranks[0]]
        for rank in ranks[1:]:
            push = fit.pushed[rank]
            if (push.clip_value, push.clip_norm, push.flags) != (first.clip_value, first.clip_norm, first.flags):
                raise RuntimeError(
                    f"Workers ranks {ranks[0]} and {rank} asked for different gradient clipping or inf checks in one "
                    f"step ({first.clip_value}, norm={bool(first.clip_norm)} against {push.clip_value}, "
                    f"norm={bool(push.clip_norm)}): every worker must clip the same way."
                )
        hyperparameters = None
        if isinstance(fit.placement, ServerOptimizer):
            hyperparameters = fit.hyperparameters[ranks[0]]
            for rank in ranks[1:]:
                other = fit.hyperparameters[rank]
                assert hyperparameters is not None
                assert other is not None
                difference = fit.placement.layout.difference(hyperparameters, other)
                if difference is not None:
                    raise RuntimeError(
                        f"The servers run one optimizer for all workers, but the hyperparameters of workers ranks "
                        f"{ranks[0]} and {rank} differ: {difference}. Every worker must change them alike: a scheduler "
                        "that monitors a metric must see the same value on each (log it with `sync_dist=True`)."
                    )
        inputs = RoundInputs(
            present=fit.present > 0,
            hyperparameters=hyperparameters,
            clip_value=first.clip_value,
            clip_norm=bool(first.clip_norm),
            check_finite=bool(first.flags & PushFlags.CHECK_FINITE),
            mean_loss=fit.loss / self.num_workers,
            exchange=self._sum_over_servers,
        )
        skipped = fit.placement.update(fit.placement.grad, inputs)
        fit.rounds += 1
        for worker in ranks:
            if isinstance(fit.placement, ServerOptimizer):
                self._send_params(fit, worker, staleness=0, skipped=skipped)
            else:
                self._send_sum(fit, worker, inputs)
        fit.pushed.clear()

    def _sum_over_servers(self, values: list[float]) -> list[float]:
        local = torch.tensor(values, dtype=torch.float64)
        assert self.fit is not None
        total = local.clone()
        for other in self.link.exchange(local, self.peers, timeout=self.fit.spec.timeout):
            total += other
        return [float(v) for v in total]

    def _release(self, fit: _Fit) -> None:
        """Async: answer the pushes whose workers are within ``max_staleness`` steps of the slowest live worker."""
        if not fit.pending:
            return
        live = [fit.clock[w] for w in range(self.num_workers) if w not in fit.done]
        slowest = min(live, default=0)
        bound = fit.spec.max_staleness
        for worker in sorted(fit.pending):
            if bound is None or fit.clock[worker] - slowest <= bound:
                self._send_params(fit, worker, fit.pending.pop(worker))

    def _send_params(self, fit: _Fit, worker: int, staleness: int, skipped: bool = False) -> None:
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        # The worker was waiting for us; its silence until now was not its fault.
        fit.last_seen[worker] = time.monotonic()
        flags = PushFlags.SKIP if skipped else PushFlags.NONE
        header = Params(placement.version, staleness, placement.flat.numel(), dtype_code(placement.flat.dtype), flags)
        self.link.send(header, worker, {"values": placement.flat}, timeout=fit.spec.timeout)

    def _send_sum(self, fit: _Fit, worker: int, inputs: RoundInputs) -> None:
        fit.last_seen[worker] = time.monotonic()
        grad = fit.placement.grad
        payloads = {"grad": grad}
        mask_numel = 0
        if not bool(inputs.present.all()):
            payloads["mask"] = inputs.present.to(torch.uint8)
            mask_numel = inputs.present.numel()
        header = Sum(fit.rounds, grad.numel(), dtype_code(grad.dtype), mask_numel, inputs.mean_loss)
        self.link.send(header, worker, payloads, timeout=fit.spec.timeout)

    # -- failure -----------------------------------------------------------------------------------------------------
    def abort(self, error: BaseException) -> None:
        """Tell every worker still reachable which rank stopped the job and why, so none waits for its timeout.

        Sends go out in parallel and wait at most the fit's ``timeout`` (a worker may be busy in a collective of
        the workers' group, and receive the reason once that collective fails).
        """
        lost = self.culprit if self.culprit is not None else -1
        reason = encode_json({"rank": lost, "error": f"{type(error).__name__}: {error}"})
        fit = self.fit
        timeout = min(fit.spec.timeout, 60.0) if fit is not None else 10.0
        skip = {lost} | (fit.done if fit is not None else set())
        threads = [
            threading.Thread(
                target=self._tell, args=(worker, Abort(lost, reason.numel()), reason, timeout), daemon=True
            )
            for worker in range(self.num_workers)
            if worker not in skip
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _tell(self, worker: int, message: Abort, reason: torch.Tensor, timeout: float) -> None:
        try:
            self.link.send(message, worker, {"json": reason}, timeout=timeout)
        except PeerLostError:
            log.debug("could not tell rank %d that the job stops", worker)
