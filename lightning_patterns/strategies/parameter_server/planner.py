"""How many parameter servers for how many workers: measure the module and this machine, predict, recommend.

:func:`profile_module` runs a few training steps of the real LightningModule on one device and times what the
cost model (:mod:`~lightning_patterns.strategies.parameter_server.cost_model`) needs: the gradient's bytes ``M``,
the step without optimizer ``C`` (with the share spent in backward), the optimizer step on a worker ``O`` and on
a server's CPU ``U``. :func:`measure_links` times this machine's copies, sums and TCP between two processes.
:func:`plan` predicts the step for S = 1 … S_max servers with each update placement and for DDP's all-reduce
with the same workers, and recommends the fastest, saying so when DDP is predicted faster. A what-if plan takes
cluster numbers (workers, nodes, bandwidth) instead of this machine's.

``lightning-patterns ps plan`` prints it for a recipe or config;
``ParameterServerStrategy(num_servers="auto")`` follows its recommendation (:func:`choose_servers`).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from lightning_patterns.strategies.parameter_server.buckets import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_FIRST_BUCKET_BYTES,
    plan_buckets,
)
from lightning_patterns.strategies.parameter_server.cost_model import (
    Cluster,
    Prediction,
    Workload,
    predict_allreduce,
    predict_parameter_server,
)
from lightning_patterns.strategies.parameter_server.link import Group
from lightning_patterns.strategies.parameter_server.partition import partition_parameters

__all__ = [
    "Plan",
    "PlanRow",
    "choose_servers",
    "count_buckets",
    "format_plan",
    "local_cluster",
    "measure_links",
    "measure_optimizer",
    "plan",
    "profile_module",
]

log = logging.getLogger(__name__)

#: The most bytes timed for a copy or a sum (a larger model streams at the same rate).
_PROBE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PlanRow:
    """One configuration of a plan.

    Attributes:
        label: ``"PS S=2 update_on=server"`` or ``"DDP"``.
        servers: ``S`` (``0`` for DDP).
        update_on: ``"worker"``, ``"server"``, or ``""`` for DDP.
        prediction: the predicted step.
        workload: the workload it was predicted for (with this configuration's buckets).
    """

    label: str
    servers: int
    update_on: str
    prediction: Prediction
    workload: Workload


@dataclass(frozen=True)
class Plan:
    """Predictions for every configuration, and the recommendation.

    Attributes:
        rows: DDP first, then each (S, placement).
        workload: what was measured or given about the model.
        cluster: where it runs.
    """

    rows: list[PlanRow]
    workload: Workload
    cluster: Cluster

    @property
    def ddp(self) -> PlanRow:
        """The all-reduce row."""
        return next(row for row in self.rows if row.servers == 0)

    @property
    def best(self) -> PlanRow:
        """The fastest parameter-server configuration (fewer servers on a tie within 1%)."""
        ps = [row for row in self.rows if row.servers > 0]
        fastest = min(row.prediction.step_seconds for row in ps)
        return next(row for row in ps if row.prediction.step_seconds <= fastest * 1.01)

    @property
    def ddp_faster(self) -> bool:
        """Whether DDP's all-reduce is predicted faster than the best parameter-server configuration."""
        return self.ddp.prediction.step_seconds < self.best.prediction.step_seconds


def count_buckets(
    numels: Sequence[int],
    itemsizes: Sequence[int],
    servers: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    first_bucket_bytes: int = DEFAULT_FIRST_BUCKET_BYTES,
) -> int:
    """Buckets a worker pushes per step with ``servers`` servers (the same plan the strategy uses)."""
    chunks = partition_parameters(numels, itemsizes, servers)
    by_server = [[c for c in chunks if c.server == s] for s in range(servers)]
    return sum(len(b) for b in plan_buckets(by_server, itemsizes, bucket_bytes, first_bucket_bytes))


def plan(
    workload: Workload,
    cluster: Cluster,
    max_servers: int,
    buckets: Callable[[int], int] | None = None,
    placements: Sequence[str] = ("worker", "server"),
) -> Plan:
    """Predict DDP and the parameter server with S = 1 … ``max_servers`` and each placement.

    Args:
        workload: the model's costs.
        cluster: where it runs.
        max_servers: the most servers to consider.
        buckets: the buckets pushed per step with S servers (``None``: ``workload.buckets``, at least S).
        placements: the update placements to consider.
    """
    rows = [PlanRow("DDP", 0, "", predict_allreduce(workload, cluster), workload)]
    for servers in range(1, max_servers + 1):
        sized = replace(workload, buckets=buckets(servers) if buckets else max(workload.buckets, servers))
        for update_on in placements:
            prediction = predict_parameter_server(sized, cluster, servers, update_on)
            rows.append(PlanRow(f"PS S={servers} update_on={update_on}", servers, update_on, prediction, sized))
    return Plan(rows, workload, cluster)


def format_plan(result: Plan) -> str:
    """The plan as a Markdown table, then the recommendation in words."""
    w, c = result.workload, result.cluster
    lines = [
        f"Model: {w.model_bytes / 1e6:.1f} MB of gradients; step without optimizer {w.compute_seconds * 1e3:.1f} ms "
        f"({w.backward_fraction:.0%} backward), optimizer {w.optimizer_seconds * 1e3:.1f} ms on a worker, "
        f"{w.server_update_seconds * 1e3:.1f} ms on a server.",
        f"Cluster: {c.workers} workers on {c.nodes} node(s)"
        + (f", servers on {c.server_nodes} node(s) of their own" if c.server_nodes else "")
        + (f", {c.cores} cores per node" if c.cores else "")
        + f"; copies {c.copy_bandwidth / 1e9:.2f} GB/s, sums {c.sum_bandwidth / 1e9:.2f} GB/s, "
        f"TCP within a node {c.tcp_bandwidth / 1e9:.2f} GB/s ({c.tcp_latency * 1e6:.0f} µs), "
        f"network {c.net_bandwidth / 1e9:.2f} GB/s ({c.net_latency * 1e6:.0f} µs).",
        "",
        "| configuration | predicted step (ms) | steps/s | exposed comm | MB per worker per step | vs DDP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ddp = result.ddp.prediction.step_seconds
    for row in result.rows:
        p = row.prediction
        lines.append(
            f"| {row.label} | {p.step_seconds * 1e3:.1f} | {1 / p.step_seconds:.2f} | {p.exposed_fraction:.0%} | "
            f"{p.bytes_per_worker / 1e6:.1f} | {ddp / p.step_seconds:.2f}× |"
        )
    best = result.best
    lines.append("")
    lines.append(
        f"Recommended: {best.label} ({best.prediction.step_seconds * 1e3:.1f} ms per step, "
        f"{ddp / best.prediction.step_seconds:.2f}× DDP's steps/s)."
    )
    if result.ddp_faster:
        lines.append(
            f"DDP is predicted faster ({ddp * 1e3:.1f} ms per step): on this cluster the all-reduce costs less than "
            "the servers' link and work. Prefer DDP, or give the servers nodes or bandwidth of their own."
        )
    return "\n".join(lines)


# -- measuring -------------------------------------------------------------------------------------------------------
def _best_of(runs: int, work: Callable[[], object], threads: int | None = None) -> float:
    """The fastest of ``runs`` runs of ``work``: wall seconds, or (``threads``) CPU seconds over that many threads.

    CPU work on the CPU is timed by the CPU time it takes, so that other processes sharing the machine do not
    inflate it: the prediction is then of a machine the job has to itself.
    """
    work()  # warm: first touches, allocator
    clock = time.process_time if threads else time.perf_counter
    times = []
    for _ in range(runs):
        start = clock()
        work()
        times.append((clock() - start) / (threads or 1))
    return min(times)


def measure_optimizer(
    numels: Sequence[int], optimizer_class: type[torch.optim.Optimizer], defaults: dict[str, Any], runs: int = 3
) -> float:
    """Seconds of one step of ``optimizer_class`` over CPU tensors of ``numels`` elements (a server's update)."""
    params = [torch.zeros(n, requires_grad=True) for n in numels]
    for param in params:
        param.grad = torch.full_like(param, 1e-3)
    optimizer = optimizer_class(params, **defaults)
    return _best_of(runs, optimizer.step, threads=torch.get_num_threads())


def _link_partner(port: int, nbytes: int, rounds: int) -> None:
    """The other end of :func:`_tcp_between_processes` (``python -m ...planner PORT NBYTES ROUNDS``)."""
    from torch._C._distributed_c10d import TCPStore
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    delta = datetime.timedelta(seconds=30)
    group = cast(Group, ProcessGroupGloo(TCPStore("127.0.0.1", port, is_master=False, timeout=delta), 1, 2, delta))
    small = torch.zeros(12, dtype=torch.float64)
    big = torch.empty(nbytes // 4)
    for _ in range(rounds):
        group.recv([small], 0, 1).wait()
        group.send([small], 0, 1).wait()
    for _ in range(3):
        group.recv([big], 0, 2).wait()
    group.send([small], 0, 3).wait()
    for _ in range(3):
        cast(Any, group).allreduce([big]).wait()


def _tcp_between_processes(nbytes: int, rounds: int = 50) -> tuple[float, float, float]:
    """Gloo over TCP between this process and a fresh one: bandwidth, latency, and an all-reduce's bandwidth.

    Returns bytes/s of one send, seconds one way of a small message, and the ring bandwidth of an all-reduce of
    ``nbytes`` (its ``2(n−1)/n · nbytes`` over its time, with n = 2).
    """
    from torch._C._distributed_c10d import TCPStore
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    delta = datetime.timedelta(seconds=30)
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=delta, wait_for_workers=False)
    partner = subprocess.Popen(
        [sys.executable, "-m", __name__, str(store.port), str(nbytes), str(rounds)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        group = cast(Group, ProcessGroupGloo(store, 0, 2, delta))
        small = torch.zeros(12, dtype=torch.float64)
        trips = []
        for _ in range(rounds):
            start = time.perf_counter()
            group.send([small], 1, 1).wait()
            group.recv([small], 1, 1).wait()
            trips.append(time.perf_counter() - start)
        latency = min(trips) / 2  # the fastest: what a machine the job has to itself would give
        big = torch.ones(nbytes // 4)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            group.send([big], 1, 2).wait()
            times.append(time.perf_counter() - start)
        group.recv([small], 1, 3).wait()  # the partner received everything
        reduced = []
        for _ in range(3):
            start, cpu = time.perf_counter(), time.process_time()
            cast(Any, group).allreduce([big]).wait()
            # On one machine the all-reduce is the two processes' CPU work (loopback copies, the sum), each on its
            # own core: its CPU time, which other processes' load does not inflate, unless it waited longer.
            reduced.append(max(time.process_time() - cpu, 0.5 * (time.perf_counter() - start)))
        return nbytes / min(times), latency, nbytes / min(reduced)
    finally:
        partner.wait(30)


def measure_links(nbytes: int, threads: int = 1, tcp: bool = True) -> dict[str, float]:
    """This machine's copy and sum bandwidth (with ``threads`` threads) and TCP between two of its processes.

    Returns:
        ``copy_bandwidth`` and ``sum_bandwidth`` (bytes moved or summed per second), ``tcp_bandwidth`` (bytes/s),
        ``tcp_latency`` (seconds one way) and ``ring_bandwidth`` (gloo's all-reduce between two processes, as the
        ring formula's bandwidth: its summing and its CPU cost on this node included).
    """
    numel = max(min(nbytes, _PROBE_BYTES) // 4, 1024)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, out = torch.randn(numel), torch.randn(numel), torch.empty(numel)
        copy = _best_of(3, lambda: out.copy_(a), threads=threads)
        add = _best_of(3, lambda: torch.add(a, b, out=out), threads=threads)
    finally:
        torch.set_num_threads(previous)
    result = {"copy_bandwidth": 4 * numel / copy, "sum_bandwidth": 2 * 4 * numel / add}
    if tcp:
        bandwidth, latency, ring = _tcp_between_processes(4 * numel)
        result.update(tcp_bandwidth=bandwidth, tcp_latency=latency, ring_bandwidth=ring)
    return result


class _StepClock:
    """Times each training step and its backward (mixed into a Lightning ``Callback``).

    On the CPU it counts the process's CPU time, which other processes sharing the machine cannot inflate; on a
    GPU, wall time once the device is done.
    """

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup = warmup
        self.steps: list[float] = []
        self.backward: list[float] = []
        self._marks: dict[str, float] = {}

    @staticmethod
    def _now(module: Any) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
            return time.perf_counter()
        return time.process_time()

    def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
        now = self._now(module)
        if "start" in self._marks and trainer.global_step > self.warmup:
            self.steps.append(now - self._marks["start"])
        self._marks["start"] = now

    def on_before_backward(self, trainer: Any, module: Any, *args: Any) -> None:
        self._marks["backward"] = self._now(module)

    def on_after_backward(self, trainer: Any, module: Any) -> None:
        if trainer.global_step >= self.warmup:
            self.backward.append(self._now(module) - self._marks["backward"])


def _time_step(optimizer: torch.optim.Optimizer, runs: int = 3) -> float:
    """Seconds of one ``optimizer.step()`` on gradients of the parameters' size (on their device)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    devices = {p.device for p in params if p.device.type == "cuda"}
    for param in params:
        param.grad = torch.full_like(param, 1e-3)

    def step() -> None:
        optimizer.step()
        for device in devices:
            torch.cuda.synchronize(device)

    return _best_of(runs, step, threads=None if devices else torch.get_num_threads())


def profile_module(
    module: Any,
    trainer_factory: Callable[..., Any],
    fit: Callable[[Any, Any], None],
    callback_class: type,
    steps: int = 5,
    warmup: int = 2,
    server_threads: int = 1,
) -> tuple[Workload, list[int], list[int]]:
    """Time ``steps`` training steps of ``module`` on one device; return its workload, tensor sizes and itemsizes.

    Args:
        module: the LightningModule (trained for a few steps: pass a copy if that matters).
        trainer_factory: builds a one-device Trainer from keyword arguments (``max_steps``, ``callbacks``, ...).
        fit: ``fit(trainer, module)`` runs it (with the module's own data or a DataModule).
        callback_class: ``Callback`` of the Lightning package the Trainer is of.
        steps: timed steps.
        warmup: steps before timing.
        server_threads: threads a server uses (its update is timed with as many).
    """
    clock = type("StepClock", (_StepClock, callback_class), {})(warmup)
    trainer = trainer_factory(max_steps=warmup + steps + 1, callbacks=[clock])
    fit(trainer, module)
    if not clock.steps or not clock.backward:
        raise RuntimeError(
            f"Profiling ran {trainer.global_step} steps, fewer than the {warmup + steps + 1} needed: give the "
            "module more training data (a longer epoch) to profile it."
        )
    step = sorted(clock.steps)[len(clock.steps) // 2]
    backward = sorted(clock.backward)[len(clock.backward) // 2]
    optimizer = trainer.optimizers[0]
    optimizer_seconds = _time_step(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    numels = [p.numel() for p in params]
    itemsizes = [p.element_size() for p in params]
    defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    previous = torch.get_num_threads()
    torch.set_num_threads(server_threads)
    try:
        server_update = measure_optimizer(numels, type(optimizer), defaults)
    except Exception as error:  # an optimizer the servers do not run: only update_on="worker" applies
        log.info("could not time %s on a server: %s", type(optimizer).__name__, error)
        server_update = float("inf")
    finally:
        torch.set_num_threads(previous)
    compute = max(step - optimizer_seconds, 1e-6)
    workload = Workload(
        model_bytes=float(sum(n * s for n, s in zip(numels, itemsizes, strict=True))),
        compute_seconds=compute,
        optimizer_seconds=optimizer_seconds,
        server_update_seconds=server_update,
        backward_fraction=min(max(backward / compute, 0.0), 1.0),
    )
    return workload, numels, itemsizes


def local_cluster(workers: int, links: dict[str, float], workers_on_cpu: bool, cores: int | None = None) -> Cluster:
    """One node of ``workers`` workers (and the servers) with this machine's measured ``links`` and cores."""
    return Cluster(
        workers=workers,
        nodes=1,
        cores=cores or os.cpu_count(),
        workers_on_cpu=workers_on_cpu,
        copy_bandwidth=links["copy_bandwidth"],
        sum_bandwidth=links["sum_bandwidth"],
        tcp_bandwidth=links["tcp_bandwidth"],
        tcp_latency=links["tcp_latency"],
        net_bandwidth=links["tcp_bandwidth"],
        net_latency=links["tcp_latency"],
        ring_bandwidth=links.get("ring_bandwidth"),
    )


def choose_servers(
    model_bytes: float, cluster: Cluster, max_servers: int, update_on: str, threads: int = 1
) -> tuple[int, Plan]:
    """``num_servers="auto"``: the S the cost model predicts fastest for this model's bytes on this machine.

    It runs before the optimizer and the data exist, so it times this machine's copies and sums, and a stand-in
    server update (SGD with momentum over ``M`` bytes: element-wise optimizers all stream a few times over the
    parameters); the step's compute is left out (it changes how much communication hides, hardly which S is
    fastest).
    """
    numel = max(int(model_bytes // 4), 1)
    links = measure_links(int(model_bytes), threads, tcp=False)
    update = measure_optimizer([min(numel, _PROBE_BYTES // 4)], torch.optim.SGD, {"lr": 0.01, "momentum": 0.9})
    update *= numel / min(numel, _PROBE_BYTES // 4)
    workload = Workload(model_bytes, 0.0, update, update)
    sized = replace(cluster, copy_bandwidth=links["copy_bandwidth"], sum_bandwidth=links["sum_bandwidth"])
    result = plan(workload, sized, max_servers, placements=(update_on,))
    return result.best.servers, result


if __name__ == "__main__":
    _link_partner(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
