"""How long a synchronous data-parallel step takes with S parameter servers, or with DDP's ring all-reduce.

Pure arithmetic (numpy only): the planner (:mod:`~lightning_patterns.strategies.parameter_server.planner`) fills
in measured or given numbers, this module predicts. Notation:

- ``n`` workers on ``N`` nodes; ``S`` servers, spread round robin over the worker nodes (server ``s`` on node
  ``s % N``) or over ``server_nodes`` nodes of their own;
- ``M``: bytes of the gradient (equal to the parameters'); ``k``: buckets a worker pushes per server;
- ``C``: a worker's time per step without the optimizer and communication (forward, backward, the loop);
  ``beta``: the share of ``C`` that is backward (pushes overlap it), ``1 - beta`` the forward;
- ``O``: the optimizer step over all parameters on a worker; ``U``: the same on a server's CPU;
- ``B_sum``: bytes of pushes a server sums per second; ``B_copy``: bytes a process copies per second (the
  shared-memory transport: a worker writes each push once and reads each reply once);
- ``B``, ``L``: bandwidth and per-message latency of the link between two processes of one node over TCP
  (``B_tcp``, ``L_tcp``), and between nodes (``B_net``, ``L_net``).

**Parameter server.** Each step each worker pushes ``M`` and pulls ``M``, split over the S servers by the
byte-balanced partition; each server receives ``n·M/S`` and sends ``n·M/S``. Per direction::

    T_link = max(M_remote / B_net + M_local / B_copy,   n_remote · M / (S · B_server))

where ``M_local`` is what goes to servers on the worker's node (shared memory) and ``M_remote`` the rest, and
``B_server`` is a server node's network bandwidth shared by the servers on it; a server answers the workers of
its own node from one shared region, which costs it nothing per worker. The servers' work::

    T_server = n · M / (S · B_sum)  +  U / S   (the second term with update_on="server" only)

The step is compute plus communication, less what overlaps::

    step = C + O_w + 2 · T_link + T_server + 2 · k · L − overlap
    O_w = O with update_on="worker" (the workers run the optimizer on the average), else 0
    overlap = min(beta · C, (1 − 1/K) · (T_link + T_sum))            pushes and sums of all but the last bucket
            + min((1 − beta) · C, (1 − 1/K) · (U/S + T_link))       update_on="server": updates and pulls of
                                                                      all but the first bucket, under the next
                                                                      forward

with ``K`` the buckets of the whole model (the servers' buckets together). Within one node the processes also
share ``cores`` CPU cores: the step is at least the node's CPU work divided by its cores, where each worker
works ``C + O_w + 2 · M_local / B_copy`` (plus TCP time: loopback copies are CPU work) and each server
``T_server`` (for a GPU worker, only the copies count).

**All-reduce (DDP).** A ring all-reduce sends and receives ``2(n−1)/n · M`` per worker, in ``k`` buckets of
``2(n−1)`` messages each, and sums ``(n−1)/n · M``::

    T_ar = 2(n−1)/n · M / B  +  2(n−1) · k · L  +  (n−1)/n · M / B_sum
    step = C + O + T_ar − min(beta · C, (1 − 1/k) · T_ar)

with ``B``, ``L`` the network's between nodes and TCP's within one (on one node, where it was measured, gloo's
own all-reduce gives ``B`` with the summing and latency folded in); on one node of CPU workers gloo's threads
work on the same cores, so the step is at least ``n · (C + O + T_ar) / cores``.

The planner compares these for S = 1 … S_max and both placements; the parameter server wins when its link
(``2·M`` per worker, independent of n, over shared memory within a node) and the single optimizer step on the
servers cost less than the all-reduce's ``2(n−1)/n · M`` per worker over TCP plus ``O`` on every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Cluster",
    "Prediction",
    "Workload",
    "allreduce_bytes_per_worker",
    "predict_allreduce",
    "predict_parameter_server",
    "ps_bytes_per_worker",
]


@dataclass(frozen=True)
class Workload:
    """What one step of the model costs, apart from synchronizing.

    Attributes:
        model_bytes: ``M``, bytes of the gradient.
        compute_seconds: ``C``, a worker's step without optimizer and communication.
        optimizer_seconds: ``O``, an optimizer step over all parameters on a worker.
        server_update_seconds: ``U``, the same optimizer step over all parameters on a server's CPU.
        backward_fraction: ``beta``, the share of ``C`` spent in backward.
        buckets: ``K``, buckets the model's gradient is pushed in (at least the number of servers).
    """

    model_bytes: float
    compute_seconds: float
    optimizer_seconds: float
    server_update_seconds: float
    backward_fraction: float = 2.0 / 3.0
    buckets: int = 1


@dataclass(frozen=True)
class Cluster:
    """Where the workers and servers run, and what links and cores they have.

    Attributes:
        workers: ``n``.
        nodes: ``N``, nodes of workers (``workers`` divisible by it).
        server_nodes: nodes of their own for the servers (``0``: servers share the worker nodes).
        cores: CPU cores per node (``None``: not a bound).
        workers_on_cpu: whether the workers compute on the CPU (then they share the cores with the servers).
        copy_bandwidth: ``B_copy`` (bytes/s).
        sum_bandwidth: ``B_sum`` (bytes/s).
        tcp_bandwidth: ``B_tcp``, TCP between two processes of one node (bytes/s).
        tcp_latency: ``L_tcp`` (s).
        net_bandwidth: ``B_net``, a node's network link (bytes/s).
        net_latency: ``L_net`` (s).
        shared_memory: whether processes of one node use shared memory (``transport="auto"``/``"shm"``).
        ring_bandwidth: ``B`` of the all-reduce formula when measured (gloo's own all-reduce on this node: its
            summing and its CPU cost included); ``None``: the link's bandwidth, and the summing apart.
    """

    workers: int
    nodes: int = 1
    server_nodes: int = 0
    cores: int | None = None
    workers_on_cpu: bool = True
    copy_bandwidth: float = 5e9
    sum_bandwidth: float = 5e9
    tcp_bandwidth: float = 1e9
    tcp_latency: float = 1e-4
    net_bandwidth: float = 1.25e9
    net_latency: float = 5e-5
    shared_memory: bool = True
    ring_bandwidth: float | None = None


@dataclass(frozen=True)
class Prediction:
    """A predicted step, and what it is made of (seconds unless named otherwise).

    Attributes:
        step_seconds: the predicted step time.
        compute_seconds: ``C`` plus the workers' optimizer step where they run it.
        comm_seconds: communication and server work before overlap.
        overlap_seconds: the part of ``comm_seconds`` hidden under computation.
        cpu_bound_seconds: the node's CPU work over its cores (``0``: no bound).
        bytes_per_worker: bytes a worker sends plus receives per step.
    """

    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    overlap_seconds: float
    cpu_bound_seconds: float
    bytes_per_worker: float

    @property
    def exposed_fraction(self) -> float:
        """The share of the step spent in communication that nothing hides."""
        return max(self.step_seconds - self.compute_seconds, 0.0) / max(self.step_seconds, 1e-12)


def ps_bytes_per_worker(model_bytes: float) -> float:
    """Bytes a worker sends plus receives per step with parameter servers: push ``M``, pull ``M``, for any S."""
    return 2.0 * model_bytes


def allreduce_bytes_per_worker(model_bytes: float, workers: int) -> float:
    """Bytes a worker sends plus receives per step in a ring all-reduce: ``2 · 2(n−1)/n · M``."""
    return 4.0 * (workers - 1) / workers * model_bytes if workers > 1 else 0.0


def _server_nodes(cluster: Cluster, servers: int) -> np.ndarray:
    """The node of each server (worker nodes ``0..N-1``, then server nodes ``N..``)."""
    if cluster.server_nodes:
        return cluster.nodes + np.arange(servers) % cluster.server_nodes
    return np.arange(servers) % cluster.nodes


def predict_parameter_server(workload: Workload, cluster: Cluster, servers: int, update_on: str) -> Prediction:
    """The step time of synchronous training with ``servers`` parameter servers (see the module's formulas).

    Raises:
        ValueError: on a number of servers below one, or an unknown ``update_on``.
    """
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}.")
    if update_on not in ("worker", "server"):
        raise ValueError(f"update_on must be 'worker' or 'server', got {update_on!r}.")
    n, m = cluster.workers, float(workload.model_bytes)
    per_node = n / cluster.nodes
    nodes = _server_nodes(cluster, servers)
    # Worker 0's view (every worker node alike): the share of each push that goes to servers on its node.
    local = float(np.mean(nodes == 0)) if cluster.shared_memory else 0.0
    same_node_tcp = float(np.mean(nodes == 0)) if not cluster.shared_memory else 0.0
    remote = 1.0 - local - same_node_tcp
    worker_link = (
        m * local / cluster.copy_bandwidth
        + m * same_node_tcp / cluster.tcp_bandwidth
        + m * remote / cluster.net_bandwidth
    )
    # The busiest server's network: the workers of other nodes, over its node's link shared by the servers on it.
    servers_per_node = float(np.max(np.bincount(nodes))) if servers else 1.0
    remote_workers = n - (per_node if not cluster.server_nodes else 0.0)
    server_link = remote_workers * m / servers * servers_per_node / cluster.net_bandwidth
    link = max(worker_link, server_link)
    summing = n * m / (servers * cluster.sum_bandwidth)
    update = workload.server_update_seconds / servers if update_on == "server" else 0.0
    latency = cluster.net_latency if remote > 0 else cluster.tcp_latency
    buckets = max(workload.buckets, servers)
    per_server_buckets = max(buckets // servers, 1)
    comm = 2.0 * link + summing + update + 2.0 * per_server_buckets * latency
    compute = workload.compute_seconds + (workload.optimizer_seconds if update_on == "worker" else 0.0)
    tail = 1.0 - 1.0 / buckets
    backward = workload.backward_fraction * workload.compute_seconds
    overlap = min(backward, tail * (link + summing))
    if update_on == "server":
        forward = (1.0 - workload.backward_fraction) * workload.compute_seconds
        overlap += min(forward, tail * (update + link))
    chain = compute + comm - overlap
    cpu = 0.0
    if cluster.cores:
        # The busiest node: a worker node (with its share of servers), or a node of servers.
        worker_cpu = 2.0 * m * local / cluster.copy_bandwidth + 2.0 * m * same_node_tcp / cluster.tcp_bandwidth
        if cluster.workers_on_cpu:
            worker_cpu += compute
        server_cpu = summing + update
        on_worker_node = float(np.sum(nodes == 0))
        loads = [per_node * worker_cpu + on_worker_node * server_cpu]
        if cluster.server_nodes:
            loads.append(servers_per_node * server_cpu)
        cpu = max(loads) / cluster.cores
    return Prediction(
        step_seconds=max(chain, cpu),
        compute_seconds=compute,
        comm_seconds=comm,
        overlap_seconds=overlap,
        cpu_bound_seconds=cpu,
        bytes_per_worker=ps_bytes_per_worker(m),
    )


def predict_allreduce(workload: Workload, cluster: Cluster) -> Prediction:
    """The step time of DDP's ring all-reduce with the same workers (see the module's formulas)."""
    n, m = cluster.workers, float(workload.model_bytes)
    compute = workload.compute_seconds + workload.optimizer_seconds
    if n == 1:
        return Prediction(compute, compute, 0.0, 0.0, 0.0, 0.0)
    bandwidth, latency = (
        (cluster.net_bandwidth, cluster.net_latency)
        if cluster.nodes > 1
        else (cluster.tcp_bandwidth, cluster.tcp_latency)
    )
    buckets = max(workload.buckets, 1)
    if cluster.ring_bandwidth and cluster.nodes == 1:
        comm = 2.0 * (n - 1) / n * m / cluster.ring_bandwidth  # measured: summing and latency included
    else:
        ring = 2.0 * (n - 1) / n * m / bandwidth
        reduce = (n - 1) / n * m / cluster.sum_bandwidth
        comm = ring + reduce + 2.0 * (n - 1) * buckets * latency
    overlap = min(workload.backward_fraction * workload.compute_seconds, (1.0 - 1.0 / buckets) * comm)
    chain = compute + comm - overlap
    cpu = 0.0
    if cluster.cores and cluster.workers_on_cpu:
        cpu = n / cluster.nodes * (compute + comm) / cluster.cores
    return Prediction(
        step_seconds=max(chain, cpu),
        compute_seconds=compute,
        comm_seconds=comm,
        overlap_seconds=overlap,
        cpu_bound_seconds=cpu,
        bytes_per_worker=allreduce_bytes_per_worker(m, n),
    )
