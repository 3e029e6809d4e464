"""The server: serves the fits of one job, one after another, until told to exit or a process fails.

Each server starts one receiver thread per worker. A thread blocks on a receive from its worker only (so a dead
worker fails it at once) and hands complete messages to the main loop through a queue; the main loop applies them
in arrival order, which is what asynchronous training needs, and bounds every wait for a worker it expects to
hear from by the fit's ``timeout``.

A fit starts with ``INIT`` from worker 0 (answered by ``ACK``); each worker of the server's host then sends
``ATTACH`` and gets the fit's shared regions (``REGIONS``): one it writes its pushes to, and the one the server
answers from, where the server keeps the averaged gradient or the parameters themselves, so answering copies
nothing. The fit ends when every worker has sent ``END``; its regions are released. Between fits the server holds
nothing and waits for the next ``INIT`` or for ``EXIT``. A worker that fails sends ``FAIL``; a worker that dies is
seen by its receiver thread; either way, during a fit, the server tells every other worker why (``ABORT``) and
exits non-zero. A worker that disconnects between fits ended the job. Set ``LP_PS_DEBUG=1`` to log every message a
server handles.

A round, per placement:

- ``"worker"``: a bucket is summed as soon as every worker pushed it (while the workers still run backward), and
  its average is sent to every worker at once.
- ``"server"``, sync: a bucket is summed as soon as every worker pushed it; once every worker committed, the
  buckets are updated one after another in offset order, which is the order the next forward needs them, and each
  is sent as soon as it is updated (norm clipping and the inf check need the whole gradient first; a bucket pushed
  again after its sum, because a hook changed it, is summed again).
- ``"server"``, async: a worker's commit applies its own pushes at once; it gets the parameters back when it is
  within ``max_staleness`` of the slowest worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.link import Link, Pending
from lightning_patterns.strategies.parameter_server.messages import (
    Abort,
    Ack,
    Attach,
    Commit,
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
    Regions,
    SetState,
    State,
    Sum,
    decode_json,
    dtype_code,
    encode_json,
)
from lightning_patterns.strategies.parameter_server.norms import BucketNorms, measure_bucket
from lightning_patterns.strategies.parameter_server.placement import (
    PLACEMENTS,
    FitSpec,
    GradientSum,
    Placement,
    RoundInputs,
    ServerOptimizer,
)
from lightning_patterns.strategies.parameter_server.shm import Region, shared_memory_available
from lightning_patterns.strategies.parameter_server.sparse.serving import SPARSE_MESSAGES, SparseServing

__all__ = ["JOIN_TIMEOUT_S", "ParameterServer", "is_sync", "join_timeout"]

log = logging.getLogger(__name__)

#: Bound on waits for a peer that is not expected to talk (between fits, all workers validating). A peer that dies
#: meanwhile is still noticed at once, because every receive names its source.
IDLE_BOUND_S = 7 * 24 * 3600.0
#: Bound on joining the process groups: every process must have started (imports, spawning) by then.
JOIN_TIMEOUT_S = 120.0
#: The norms in the reply to a bucket that was not measured.
_UNMEASURED = BucketNorms(0.0, 0.0, 0.0)


def join_timeout(timeout: float) -> float:
    """Bound on joining the process groups (and on barriers): ``timeout``, but at least ``JOIN_TIMEOUT_S``."""
    return max(timeout, JOIN_TIMEOUT_S)


def is_sync(mode: str, max_staleness: int | None) -> bool:
    """Whether servers apply synchronous rounds: ``mode="sync"``, or ``"async"`` with ``max_staleness=0``."""
    return mode == "sync" or max_staleness == 0


class _Fit:
    """What a server keeps for the fit it serves: the placement's state, the regions and the round bookkeeping."""

    def __init__(self, spec: FitSpec, placement: Placement, num_workers: int, regions: list[Region]) -> None:
        self.spec = spec
        self.placement = placement
        self.num_workers = num_workers
        self.regions = regions
        self.chunk_ranges: list[range] = _chunk_ranges(spec)
        self.bucket_offsets = [0]
        for numel in spec.buckets:
            self.bucket_offsets.append(self.bucket_offsets[-1] + numel)
        #: Where each worker's pushes land: its shared region, or a host buffer of the server.
        self.staging: list[torch.Tensor | None] = [None] * num_workers
        #: Each worker's region for the parameters of async replies (its own: the server updates between replies).
        self.replies: dict[int, torch.Tensor] = {}
        self.pushes: list[dict[int, Push]] = [{} for _ in range(num_workers)]  # this round's, by bucket
        self.masks: list[dict[int, torch.Tensor]] = [{} for _ in range(num_workers)]  # by bucket, where not all there
        self.complete: dict[int, int] = {}  # sync: bucket -> workers that pushed it this round
        self.summed: set[int] = set()  # "server", sync: buckets of this round already summed
        self.commits: dict[int, Commit] = {}  # "server", sync: this round's
        self.norms: dict[int, BucketNorms] = {}  # this round's measured buckets (when the workers asked)
        initial = placement.initial_hyperparameters if isinstance(placement, ServerOptimizer) else None
        self.hyperparameters: list[torch.Tensor | None] = [initial] * num_workers  # each worker's latest
        self.clock = [0] * num_workers  # rounds per worker
        self.waiting: set[int] = set()  # workers waiting for this server's reply to their round
        self.pending: dict[int, int] = {}  # async: worker -> staleness of the commit awaiting its parameters
        self.active = [False] * num_workers
        self.last_seen = [time.monotonic()] * num_workers
        self.done: set[int] = set()
        self.rounds = 0
        self.sends: list[Pending] = []
        self.sparse: SparseServing | None = None  # the fit's sparse tables, from its SPARSE_INIT

    def expected(self) -> list[int]:
        """Workers that owe the server a message: training, not finished, and not waiting for its reply."""
        return [w for w in range(self.num_workers) if self.active[w] and w not in self.done and w not in self.waiting]

    def in_round(self) -> bool:
        """Whether a synchronous round has started and is not complete."""
        return bool(self.waiting) or any(self.pushes)

    def release(self) -> None:
        """Give the fit's shared memory back (it is freed once no worker maps it either)."""
        for region in self.regions:
            region.release()
        self.regions = []


def _chunk_ranges(spec: FitSpec) -> list[range]:
    """The chunks of each bucket (a bucket's elements are whole chunks); :class:`ProtocolError` if they are not."""
    ranges = []
    chunk = 0
    for index, numel in enumerate(spec.buckets):
        first, total = chunk, 0
        while total < numel and chunk < len(spec.chunk_numels):
            total += spec.chunk_numels[chunk]
            chunk += 1
        if total != numel:
            raise ProtocolError(f"INIT's bucket {index} of {numel} elements does not end at a chunk boundary.")
        ranges.append(range(first, chunk))
    return ranges


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
        self.fits = 0
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
                message, payloads, _ = self.link.recv(
                    worker, timeout=IDLE_BOUND_S, into=lambda message: self._landing(worker, message)
                )
                self.inbox.put((worker, message, payloads))
                if isinstance(message, Exit):
                    return
        except (PeerLostError, ProtocolError) as error:
            self.inbox.put((worker, None, error))

    def _landing(self, worker: int, message: Message) -> Mapping[str, torch.Tensor]:
        """Where a push of ``worker`` is received over TCP: its staging buffer (allocated on its first push)."""
        fit = self.fit
        if fit is None or not isinstance(message, Push):
            return {}
        staging = fit.staging[worker]
        if staging is None:
            staging = torch.zeros(fit.spec.numel, dtype=fit.spec.dtype)
            fit.staging[worker] = staging
        return {"grad": staging}

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
        placement = fit.placement
        if isinstance(message, SPARSE_MESSAGES):
            if fit.sparse is None:
                post = partial(self._post, fit)
                fit.sparse = SparseServing(self.rank - self.num_workers, self.num_workers, fit.spec.sync, post)
            fit.sparse.handle(worker, message, payloads)
        elif isinstance(message, Push):
            self._push(fit, worker, message, payloads)
        elif isinstance(message, Commit) and isinstance(placement, ServerOptimizer):
            self._commit(fit, worker, message, payloads)
        elif isinstance(message, Attach):
            self._attach(fit, worker)
        elif isinstance(message, Pull) and isinstance(placement, ServerOptimizer):
            self._send_params(fit, worker, staleness=0)
        elif isinstance(message, Pause):
            fit.active[worker] = False
        elif isinstance(message, End):
            self._end(fit, worker)
        elif isinstance(message, GetState) and isinstance(placement, ServerOptimizer):
            described, data = placement.state()
            reply = encode_json(described)
            self.link.send(State(reply.numel(), data.numel()), worker, {"json": reply, "data": data})
        elif isinstance(message, SetState) and isinstance(placement, ServerOptimizer):
            described = decode_json(payloads["json"], f"SET_STATE from rank {worker}") if "json" in payloads else []
            placement.load_state(described, payloads.get("data", torch.empty(0, dtype=torch.uint8)), worker)
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
        regions: list[Region] = []
        allocate = None
        if spec.sync and self._shares_memory_with_workers(spec):
            # The server answers from this region: workers of this host read the replies there, in place.
            itemsize = torch.empty(0, dtype=spec.dtype).element_size()
            region = Region.create(f"r{self.rank}-fit{self.fits}-reply", spec.numel * itemsize)
            regions.append(region)

            def allocate(numel: int, dtype: torch.dtype) -> torch.Tensor:
                return region.tensor(dtype, numel)

        placement = PLACEMENTS.get(spec.placement)(spec, payloads.get("values"), allocate)
        self.fit = _Fit(spec, placement, self.num_workers, regions)
        self.fits += 1
        log.info(
            "serving a fit: %d chunks (%d elements) in %d buckets, update_on=%r%s, %s, transport=%s",
            len(spec.chunk_numels),
            spec.numel,
            len(spec.buckets),
            spec.placement,
            f" with {spec.optimizer}" if spec.optimizer else "",
            "sync" if spec.sync else f"async(max_staleness={spec.max_staleness})",
            spec.transport,
        )
        self.link.send(Ack(), worker, timeout=spec.timeout)

    def _shares_memory_with_workers(self, spec: FitSpec) -> bool:
        if spec.transport == "tcp" or not shared_memory_available():
            return False
        return any(self.link.shared_memory(w) is not None for w in range(self.num_workers))

    def _attach(self, fit: _Fit, worker: int) -> None:
        """Give ``worker`` (of this host) its push region and the reply region; use them from now on."""
        transport = self.link.shared_memory(worker)
        if transport is None or fit.spec.transport == "tcp" or (fit.spec.sync and not fit.regions):
            raise ProtocolError(f"Rank {worker} sent ATTACH, but it does not share memory with server {self.rank}.")
        spec = fit.spec
        nbytes = spec.numel * torch.empty(0, dtype=spec.dtype).element_size()
        push = Region.create(f"r{self.rank}-fit{self.fits - 1}-push{worker}", nbytes)
        fit.regions.append(push)
        staging = fit.staging[worker] = push.tensor(spec.dtype, spec.numel)
        if spec.sync:
            reply_region = fit.regions[0]
            reply = fit.placement.reply
        else:  # async: each worker reads a copy of the parameters made when its reply is due
            reply_region = Region.create(f"r{self.rank}-fit{self.fits - 1}-reply{worker}", nbytes)
            fit.regions.append(reply_region)
            reply = fit.replies[worker] = reply_region.tensor(spec.dtype, spec.numel)
        transport.attach(outgoing={"grad": reply, "values": reply}, incoming={"grad": staging})
        described = encode_json({"push": push.describe(), "pull": reply_region.describe()})
        self.link.send(Regions(described.numel()), worker, {"json": described}, timeout=spec.timeout)

    def _end(self, fit: _Fit, worker: int) -> None:
        fit.done.add(worker)
        fit.active[worker] = False
        if fit.spec.sync and fit.in_round():
            waiting = sorted(fit.waiting | {w for w in range(self.num_workers) if fit.pushes[w]})
            raise RuntimeError(
                f"Worker rank {worker} ended its fit while ranks {waiting} wait in a synchronous step: the "
                "workers ran different numbers of optimizer steps (a different `max_steps`, or a stopping rule that "
                "is not decided on every rank alike)."
            )
        self._release(fit)
        if len(fit.done) < self.num_workers:
            return
        log.info("fit ended after %d updates", fit.rounds)
        self._drain(fit)
        for w in range(self.num_workers):
            transport = self.link.shared_memory(w)
            if transport is not None:
                transport.detach()
        fit.release()
        self.fit = None
        deferred, self.deferred = self.deferred, []
        for sender, message, payloads in deferred:
            self._handle(sender, message, payloads)

    # -- pushes ------------------------------------------------------------------------------------------------------
    def _push(self, fit: _Fit, worker: int, message: Push, payloads: dict[str, torch.Tensor]) -> None:
        spec = fit.spec
        index = message.bucket
        if not 0 <= index < len(spec.buckets) or message.offset != fit.bucket_offsets[index]:
            raise ProtocolError(f"Rank {worker} pushed bucket {index} at offset {message.offset}, which is not one.")
        grad, mask = payloads["grad"], payloads.get("mask")
        if grad.numel() != spec.buckets[index] or grad.dtype != spec.dtype:
            raise ProtocolError(
                f"Rank {worker} pushed {grad.numel()} {grad.dtype} for bucket {index}; expected "
                f"{spec.buckets[index]} {spec.dtype}."
            )
        chunks = fit.chunk_ranges[index]
        if mask is not None and mask.numel() != len(chunks):
            raise ProtocolError(f"Rank {worker} pushed a mask of {mask.numel()} chunks; expected {len(chunks)}.")
        if fit.done and spec.sync:
            raise RuntimeError(
                f"Worker rank {worker} pushed step {message.step} after ranks {sorted(fit.done)} ended their fit: the "
                "workers ran different numbers of optimizer steps."
            )
        replace = bool(message.flags & PushFlags.REPLACE)
        if replace and isinstance(fit.placement, GradientSum):
            raise ProtocolError(
                f"Rank {worker} replaced bucket {index}, but update_on='worker' sums each bucket as it arrives."
            )
        if (index in fit.pushes[worker]) != replace:
            what = "replaced a bucket it had not pushed" if replace else "pushed a bucket twice"
            raise ProtocolError(f"Rank {worker} {what} in one round (bucket {index}).")
        staging = fit.staging[worker]
        if staging is None:
            staging = fit.staging[worker] = torch.zeros(spec.numel, dtype=spec.dtype)
        target = staging[message.offset : message.offset + grad.numel()]
        if target.data_ptr() != grad.data_ptr():  # received before this fit's buffers existed
            target.copy_(grad)
        fit.pushes[worker][index] = message
        if mask is None:
            fit.masks[worker].pop(index, None)
        else:
            fit.masks[worker][index] = mask.clone()
        fit.active[worker] = True
        if replace:
            fit.summed.discard(index)  # summed with the gradient it replaces: sum again at the commit
            return
        if not spec.sync:
            return  # async: applied at the worker's commit
        count = fit.complete.get(index, 0) + 1
        fit.complete[index] = count
        if isinstance(fit.placement, GradientSum):
            if len(fit.pushes[worker]) == len(spec.buckets):
                fit.waiting.add(worker)
                fit.clock[worker] += 1
            if count == self.num_workers:
                self._answer_bucket(fit, index)
        elif count == self.num_workers:
            # Sum while the workers still run backward; the commit then only updates (a later REPLACE sums again).
            self._sum_bucket(fit, index, list(range(self.num_workers)))
            fit.summed.add(index)

    def _sum_bucket(self, fit: _Fit, index: int, workers: list[int]) -> None:
        """Sum the workers' pushes of bucket ``index`` into the placement's gradient (the average, once divided)."""
        lo, hi = fit.bucket_offsets[index], fit.bucket_offsets[index + 1]
        out = fit.placement.grad[lo:hi]
        views = [fit.staging[w][lo:hi] for w in workers]  # type: ignore[index]
        scaled = [bool(fit.pushes[w][index].scaled) for w in workers]
        if all(scaled):
            if len(views) == 1:
                out.copy_(views[0])
            else:
                torch.add(views[0], views[1], out=out)
                for view in views[2:]:
                    out.add_(view)
        else:
            out.zero_()
            for view, is_scaled in zip(views, scaled, strict=True):
                out.add_(view, alpha=1.0 if is_scaled else 1.0 / self.num_workers)
        samples = [fit.pushes[w][index].samples for w in workers]
        if len(workers) == self.num_workers and min(samples) > 0:
            # Every worker asked (a synchronous round): measure here, where the pushes and the average already are.
            fit.norms[index] = measure_bucket(views, scaled, out, samples)
        else:
            fit.norms.pop(index, None)

    def _present(self, fit: _Fit, workers: list[int], buckets: range) -> torch.Tensor:
        """Per chunk of the server: whether any of ``workers`` had a gradient for it (in ``buckets``)."""
        present = torch.zeros(len(fit.spec.chunk_numels), dtype=torch.bool)
        for index in buckets:
            chunks = fit.chunk_ranges[index]
            for worker in workers:
                mask = fit.masks[worker].get(index)
                if mask is None:
                    present[chunks.start : chunks.stop] = True
                    break
                present[chunks.start : chunks.stop] |= mask != 0
        return present

    def _answer_bucket(self, fit: _Fit, index: int) -> None:
        """``"worker"``: every worker pushed bucket ``index``: send them all its average at once."""
        workers = list(range(self.num_workers))
        self._drain(fit)
        self._sum_bucket(fit, index, workers)
        chunks = fit.chunk_ranges[index]
        present = self._present(fit, workers, range(index, index + 1))[chunks.start : chunks.stop]
        loss = sum(fit.pushes[w][index].loss for w in workers) / self.num_workers
        lo, hi = fit.bucket_offsets[index], fit.bucket_offsets[index + 1]
        payloads = {"grad": fit.placement.grad[lo:hi]}
        mask_numel = 0
        if not bool(present.all()):
            payloads["mask"] = present.to(torch.uint8)
            mask_numel = present.numel()
        norms = fit.norms.pop(index, _UNMEASURED)
        header = Sum(
            fit.rounds + 1,
            index,
            lo,
            hi - lo,
            dtype_code(fit.spec.dtype),
            mask_numel,
            loss,
            norms.small_sqr,
            norms.big_sqr,
            norms.inverse_batch,
        )
        for worker in workers:
            self._post(fit, worker, header, payloads)
        del fit.complete[index]
        if not fit.complete and all(len(p) == len(fit.spec.buckets) for p in fit.pushes):
            fit.rounds += 1
            for worker in workers:
                fit.pushes[worker].clear()
                fit.masks[worker].clear()
            fit.waiting.clear()

    # -- commits (``"server"``) --------------------------------------------------------------------------------------
    def _commit(self, fit: _Fit, worker: int, message: Commit, payloads: dict[str, torch.Tensor]) -> None:
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        if "hyper" in payloads:
            if payloads["hyper"].numel() != placement.layout.numel:
                raise ProtocolError(f"Rank {worker} committed hyperparameters this fit does not lay out.")
            fit.hyperparameters[worker] = payloads["hyper"].clone()
        missing = sorted(set(range(len(fit.spec.buckets))) - set(fit.pushes[worker]))
        if missing:
            raise ProtocolError(f"Rank {worker} committed step {message.step} without pushing buckets {missing}.")
        fit.active[worker] = True
        fit.clock[worker] += 1
        if not fit.spec.sync:
            self._apply_async(fit, worker, message)
            return
        if fit.done:
            raise RuntimeError(
                f"Worker rank {worker} committed step {message.step} after ranks {sorted(fit.done)} ended their fit: "
                "the workers ran different numbers of optimizer steps."
            )
        fit.commits[worker] = message
        fit.waiting.add(worker)
        if len(fit.commits) == self.num_workers:
            self._apply_round(fit)

    def _round_inputs(self, fit: _Fit) -> RoundInputs:
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        ranks = sorted(fit.commits)
        first = fit.commits[ranks[0]]
        for rank in ranks[1:]:
            other = fit.commits[rank]
            if (other.clip_value, other.clip_norm, other.flags, other.unscale) != (
                first.clip_value,
                first.clip_norm,
                first.flags,
                first.unscale,
            ):
                raise RuntimeError(
                    f"Workers ranks {ranks[0]} and {rank} asked for different gradient clipping or inf checks in one "
                    f"step ({first.clip_value}, norm={bool(first.clip_norm)} against {other.clip_value}, "
                    f"norm={bool(other.clip_norm)}): every worker must clip the same way."
                )
        hyperparameters = fit.hyperparameters[ranks[0]]
        for rank in ranks[1:]:
            assert hyperparameters is not None
            difference = placement.layout.difference(hyperparameters, fit.hyperparameters[rank])  # type: ignore[arg-type]
            if difference is not None:
                raise RuntimeError(
                    f"The servers run one optimizer for all workers, but the hyperparameters of workers ranks "
                    f"{ranks[0]} and {rank} differ: {difference}. Every worker must change them alike: a scheduler "
                    "that monitors a metric must see the same value on each (log it with `sync_dist=True`)."
                )
        return RoundInputs(
            present=self._present(fit, ranks, range(len(fit.spec.buckets))),
            hyperparameters=hyperparameters,
            clip_value=first.clip_value,
            clip_norm=bool(first.clip_norm),
            check_finite=bool(first.flags & PushFlags.CHECK_FINITE),
            exchange=self._sum_over_servers,
            unscale=first.unscale,
        )

    def _apply_round(self, fit: _Fit) -> None:
        """``"server"``, sync: every worker committed: update bucket by bucket, answering each as it is done."""
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        inputs = self._round_inputs(fit)
        workers = list(range(self.num_workers))
        self._drain(fit)
        buckets = range(len(fit.spec.buckets))
        if placement.needs_whole_gradient(inputs):
            for index in buckets:
                if index not in fit.summed:
                    self._sum_bucket(fit, index, workers)
            skipped = placement.update(placement.grad, inputs)
            for worker in workers:
                self._send_params(fit, worker, staleness=0, skipped=skipped)
        else:
            placement.begin_round(inputs)
            for index in buckets:
                if index not in fit.summed:
                    self._sum_bucket(fit, index, workers)
                placement.step_chunks(fit.chunk_ranges[index], inputs)
                for worker in workers:
                    self._send_params(fit, worker, staleness=0, buckets=range(index, index + 1))
            placement.end_round()
        fit.rounds += 1
        fit.commits.clear()
        fit.complete.clear()
        fit.summed.clear()
        fit.norms.clear()
        for worker in workers:
            fit.pushes[worker].clear()
            fit.masks[worker].clear()
        fit.waiting.clear()

    def _apply_async(self, fit: _Fit, worker: int, message: Commit) -> None:
        """Async: apply ``worker``'s pushes now (unless it flagged them); answer when the staleness bound allows."""
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        staleness = placement.version - min(push.version for push in fit.pushes[worker].values())
        if not message.flags & PushFlags.SKIP:
            self._drain(fit)
            for index in range(len(fit.spec.buckets)):
                self._sum_bucket(fit, index, [worker])
            inputs = RoundInputs(
                present=self._present(fit, [worker], range(len(fit.spec.buckets))),
                hyperparameters=fit.hyperparameters[worker],
                unscale=message.unscale,
            )
            placement.update(placement.grad, inputs)
            fit.rounds += 1
        fit.pushes[worker].clear()
        fit.masks[worker].clear()
        fit.pending[worker] = staleness
        fit.waiting.add(worker)
        self._release(fit)

    def _sum_over_servers(self, values: list[float]) -> list[float]:
        local = torch.tensor(values, dtype=torch.float64)
        assert self.fit is not None
        total = local.clone()
        for other in self.link.exchange(local, self.peers, timeout=self.fit.spec.timeout):
            total += other
        return [float(v) for v in total]

    def _release(self, fit: _Fit) -> None:
        """Async: answer the commits whose workers are within ``max_staleness`` steps of the slowest live worker."""
        if not fit.pending:
            return
        live = [fit.clock[w] for w in range(self.num_workers) if w not in fit.done]
        slowest = min(live, default=0)
        bound = fit.spec.max_staleness
        for worker in sorted(fit.pending):
            if bound is None or fit.clock[worker] - slowest <= bound:
                self._send_params(fit, worker, fit.pending.pop(worker))
                fit.waiting.discard(worker)

    # -- replies -----------------------------------------------------------------------------------------------------
    def _send_params(
        self, fit: _Fit, worker: int, staleness: int, skipped: bool = False, buckets: range | None = None
    ) -> None:
        placement = fit.placement
        assert isinstance(placement, ServerOptimizer)
        flags = PushFlags.SKIP if skipped else PushFlags.NONE
        code = dtype_code(placement.flat.dtype)
        for index in buckets if buckets is not None else range(len(fit.spec.buckets)):
            lo, hi = fit.bucket_offsets[index], fit.bucket_offsets[index + 1]
            norms = fit.norms.get(index, _UNMEASURED)
            header = Params(
                placement.version,
                staleness,
                index,
                lo,
                hi - lo,
                code,
                flags,
                norms.small_sqr,
                norms.big_sqr,
                norms.inverse_batch,
            )
            self._post(fit, worker, header, {"values": placement.flat[lo:hi]})

    def _post(self, fit: _Fit, worker: int, header: Message, payloads: dict[str, torch.Tensor]) -> None:
        # The worker was waiting for us; its silence until now was not its fault.
        fit.last_seen[worker] = time.monotonic()
        fit.sends.append(self.link.post(header, worker, payloads))

    def _drain(self, fit: _Fit) -> None:
        """Wait for the replies still being sent: their buffers are about to change."""
        sends, fit.sends = fit.sends, []
        for pending in sends:
            pending.wait(fit.spec.timeout)

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
