"""The cost model's formulas and bounds, over random workloads and clusters (Hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.strategies.parameter_server.cost_model import (
    Cluster,
    Workload,
    allreduce_bytes_per_worker,
    predict_allreduce,
    predict_parameter_server,
    ps_bytes_per_worker,
)

seconds = st.floats(1e-4, 1.0)
bandwidth = st.floats(1e7, 1e11)
workloads = st.builds(
    Workload,
    model_bytes=st.floats(1e3, 1e10),
    compute_seconds=seconds,
    optimizer_seconds=seconds,
    server_update_seconds=seconds,
    backward_fraction=st.floats(0.0, 1.0),
    buckets=st.integers(1, 64),
)


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    nodes = draw(st.integers(1, 16))
    return Cluster(
        workers=nodes * draw(st.integers(1, 8)),
        nodes=nodes,
        server_nodes=draw(st.integers(0, 8)),
        cores=draw(st.none() | st.integers(1, 64)),
        workers_on_cpu=draw(st.booleans()),
        copy_bandwidth=draw(bandwidth),
        sum_bandwidth=draw(bandwidth),
        tcp_bandwidth=draw(bandwidth),
        tcp_latency=draw(st.floats(0.0, 1e-3)),
        net_bandwidth=draw(bandwidth),
        net_latency=draw(st.floats(0.0, 1e-3)),
        shared_memory=draw(st.booleans()),
    )


placements = st.sampled_from(["worker", "server"])


@given(st.floats(1.0, 1e12), st.integers(1, 1024))
def test_bytes_per_worker_follow_the_formulas(model_bytes: float, workers: int) -> None:
    assert ps_bytes_per_worker(model_bytes) == 2 * model_bytes  # push M, pull M, whatever S and n
    expected = 4 * (workers - 1) / workers * model_bytes
    assert allreduce_bytes_per_worker(model_bytes, workers) == pytest.approx(expected)
    assert allreduce_bytes_per_worker(model_bytes, workers) < 4 * model_bytes


@given(workloads, clusters(), st.integers(1, 16), placements)
def test_a_step_is_never_shorter_than_its_compute_or_its_cpu_work(
    workload: Workload, cluster: Cluster, servers: int, update_on: str
) -> None:
    for prediction in (
        predict_parameter_server(workload, cluster, servers, update_on),
        predict_allreduce(workload, cluster),
    ):
        assert prediction.step_seconds >= prediction.compute_seconds * (1 - 1e-12)
        assert prediction.step_seconds >= prediction.cpu_bound_seconds * (1 - 1e-12)
        assert 0 <= prediction.overlap_seconds <= prediction.comm_seconds + 1e-12
        assert prediction.overlap_seconds <= workload.compute_seconds + 1e-12
        assert 0.0 <= prediction.exposed_fraction < 1.0


@given(workloads, st.integers(1, 64), st.integers(1, 16), placements)
def test_free_communication_leaves_the_compute(workload: Workload, workers: int, servers: int, update_on: str) -> None:
    """Infinite links, no latency, no server work: both strategies cost what the workers compute."""
    free = Cluster(
        workers=workers,
        copy_bandwidth=float("inf"),
        sum_bandwidth=float("inf"),
        tcp_bandwidth=float("inf"),
        tcp_latency=0.0,
        net_bandwidth=float("inf"),
        net_latency=0.0,
    )
    idle = dataclasses.replace(workload, server_update_seconds=0.0)
    optimizer = workload.optimizer_seconds if update_on == "worker" else 0.0
    ps = predict_parameter_server(idle, free, servers, update_on)
    assert ps.step_seconds == pytest.approx(workload.compute_seconds + optimizer)
    ddp = predict_allreduce(idle, free)
    assert ddp.step_seconds == pytest.approx(workload.compute_seconds + workload.optimizer_seconds)


@given(workloads, st.integers(2, 64), st.floats(1e8, 1e10), placements)
def test_servers_of_their_own_share_the_load_of_a_slow_network(
    workload: Workload, workers: int, net: float, update_on: str
) -> None:
    """One server per server node, network-bound: the servers' link term halves when S doubles."""
    fast = {
        "copy_bandwidth": 1e15,
        "sum_bandwidth": 1e15,
        "tcp_bandwidth": 1e15,
        "tcp_latency": 0.0,
        "net_latency": 0.0,
    }
    slow = dataclasses.replace(workload, compute_seconds=0.0, server_update_seconds=0.0)
    one = predict_parameter_server(slow, Cluster(workers, workers, 1, net_bandwidth=net, **fast), 1, update_on)
    two = predict_parameter_server(slow, Cluster(workers, workers, 2, net_bandwidth=net, **fast), 2, update_on)
    link = workers * workload.model_bytes / net
    optimizer = workload.optimizer_seconds if update_on == "worker" else 0.0
    assert one.step_seconds == pytest.approx(optimizer + 2 * max(workload.model_bytes / net, link), rel=1e-5)
    assert two.step_seconds == pytest.approx(optimizer + 2 * max(workload.model_bytes / net, link / 2), rel=1e-5)


@given(workloads, clusters(), st.integers(1, 8), placements, st.floats(1.5, 100.0))
def test_more_bandwidth_never_slows_a_step(
    workload: Workload, cluster: Cluster, servers: int, update_on: str, factor: float
) -> None:
    faster = dataclasses.replace(
        cluster, net_bandwidth=cluster.net_bandwidth * factor, tcp_bandwidth=cluster.tcp_bandwidth * factor
    )
    before = predict_parameter_server(workload, cluster, servers, update_on).step_seconds
    assert predict_parameter_server(workload, faster, servers, update_on).step_seconds <= before * (1 + 1e-9)
    assert predict_allreduce(workload, faster).step_seconds <= predict_allreduce(workload, cluster).step_seconds * (
        1 + 1e-9
    )


def test_one_worker_needs_no_all_reduce_and_arguments_are_checked() -> None:
    workload = Workload(1e8, 0.1, 0.02, 0.02)
    alone = predict_allreduce(workload, Cluster(workers=1))
    assert (alone.step_seconds, alone.bytes_per_worker) == (pytest.approx(0.12), 0.0)
    with pytest.raises(ValueError, match="servers must be >= 1, got 0"):
        predict_parameter_server(workload, Cluster(workers=2), 0, "worker")
    with pytest.raises(ValueError, match="update_on must be 'worker' or 'server', got 'both'"):
        predict_parameter_server(workload, Cluster(workers=2), 1, "both")
