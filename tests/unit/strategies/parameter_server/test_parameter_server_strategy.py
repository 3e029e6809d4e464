"""Single-process tests of ParameterServerStrategy: registration, arguments, messages, telemetry."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lightning_patterns.strategies as strategies
from lightning_patterns import _lightning
from lightning_patterns.adaptive import ReportsGradientNorms
from lightning_patterns.strategies import ParameterServerStrategy
from lightning_patterns.strategies.parameter_server.launcher import servers_on_node
from lightning_patterns.strategies.parameter_server.shm import HostCard
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry


def test_registered_with_lightning(lightning_package: Any) -> None:
    registry = lightning_package.pl.strategies.StrategyRegistry
    assert "parameter_server" in registry
    assert "parameter_server_async" in registry
    assert registry["parameter_server"]["strategy"] is lightning_package.classes.ParameterServerStrategy
    # Registering again must not raise.
    _lightning.register_strategies(lightning_package.name)
    assert strategies.__all__ == sorted(strategies.__all__)


@pytest.mark.parametrize(
    ("name", "update_on", "mode", "max_staleness"),
    [("parameter_server", "worker", "sync", 0), ("parameter_server_async", "server", "async", None)],
)
def test_trainer_accepts_the_registered_names(
    lightning_package: Any, name: str, update_on: str, mode: str, max_staleness: int | None
) -> None:
    pl = lightning_package.pl
    trainer = pl.Trainer(strategy=name, devices=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    strategy = trainer.strategy
    assert isinstance(strategy, lightning_package.classes.ParameterServerStrategy)
    assert isinstance(strategy, pl.strategies.ParallelStrategy)
    assert (strategy.update_on, strategy.mode, strategy.max_staleness, strategy.num_servers) == (
        update_on,
        mode,
        max_staleness,
        1,
    )
    assert strategy.broadcast_buffers
    assert not hasattr(strategy, "num_workers"), "a DataLoader's `num_workers` is another thing"
    assert strategy.world_size == 2  # Lightning's world: the workers; servers come after them
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    assert strategy.is_distributed
    assert type(strategy.launcher).__name__ == "_SubprocessScriptLauncher"


def test_spawn_start_method_uses_the_multiprocessing_launcher(lightning_package: Any) -> None:
    strategy = lightning_package.classes.ParameterServerStrategy(start_method="spawn")
    trainer = lightning_package.pl.Trainer(strategy=strategy, devices=2, accelerator="cpu", logger=False)
    assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_servers": 0}, "num_servers"),
        ({"num_servers": 1.5}, "num_servers"),
        ({"num_servers": True}, "num_servers"),
        ({"num_servers": "many"}, r"`num_servers` must be an integer >= 1 or 'auto', got num_servers='many'"),
        ({"mode": "hogwild"}, "mode"),
        ({"update_on": "parameter"}, r"`update_on` must be one of \['server', 'worker'\]"),
        (
            {"mode": "async", "max_staleness": None},
            r"`update_on='worker'` averages every step's gradients .*update_on='server', mode='async'",
        ),
        ({"update_on": "worker", "mode": "async", "max_staleness": 2}, "synchronous only"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"max_staleness": 1.0}, "max_staleness"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5.0}, "timeout"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"start_method": "thread"}, "start_method"),
        ({"transport": "rdma"}, r"`transport` must be one of \('auto', 'shm', 'tcp'\), got transport='rdma'"),
        ({"bucket_bytes": 0}, "bucket_bytes"),
        ({"sparse_modules": "tables.0"}, r"`sparse_modules` must be a list of qualified module names"),
        ({"sparse_modules": ["ok", ""]}, r"`sparse_modules` must be a list"),
        ({"sparse_min_rows": 0}, r"`sparse_min_rows` must be None or an integer >= 1, got sparse_min_rows=0"),
        ({"sparse_gather_bytes": -1}, r"`sparse_gather_bytes` must be an integer >= 0"),
        (
            {"sparse_mode": "hogwild"},
            r"`sparse_mode` must be None \(as `mode`\), 'sync' or 'async', got sparse_mode='hogwild'",
        ),
        (
            {"update_on": "server", "mode": "async", "max_staleness": 1, "sparse_mode": "sync"},
            r"`sparse_mode='sync'` needs synchronous dense rounds, got mode='async', max_staleness=1: .*"
            r"mode='sync' with sparse_mode='async'",
        ),
        (
            {"sparse_mode": "async", "sparse_max_staleness": -1},
            r"`sparse_max_staleness` must be None or an integer >= 0, got sparse_max_staleness=-1",
        ),
        ({"sparse_mode": "async", "sparse_max_staleness": True}, r"got sparse_max_staleness=True"),
        (
            {"sparse_max_staleness": 1},
            r"`sparse_max_staleness` bounds the asynchronous tables of a synchronous fit .*sparse_mode=None\. "
            r"Pass sparse_mode='async' with mode='sync'",
        ),
        (
            {
                "update_on": "server",
                "mode": "async",
                "max_staleness": 2,
                "sparse_mode": "async",
                "sparse_max_staleness": 1,
            },
            r"got mode='async', max_staleness=2, sparse_mode='async'",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParameterServerStrategy(**kwargs)


def test_sparse_modes_accepted() -> None:
    """The hybrid (sync dense, async sparse, bounded or not), and async tables in an async fit (as `mode`)."""
    hybrid = ParameterServerStrategy(sparse_mode="async", sparse_max_staleness=0)
    assert (hybrid.mode, hybrid.sparse_mode, hybrid.sparse_max_staleness) == ("sync", "async", 0)
    assert ParameterServerStrategy(sparse_mode="async").sparse_max_staleness is None
    assert ParameterServerStrategy(update_on="server", mode="async", max_staleness=0, sparse_mode="sync").sparse_mode
    asynchronous = ParameterServerStrategy(update_on="server", mode="async", max_staleness=None, sparse_mode="async")
    assert asynchronous.sparse_mode == "async"


def test_auto_servers_are_decided_at_the_first_fit() -> None:
    strategy = ParameterServerStrategy(num_servers="auto", transport="shm", bucket_bytes=1 << 20)
    assert (strategy.num_servers, strategy.auto_servers, strategy.plan) == (0, True, None)
    assert (strategy.transport, strategy.bucket_bytes) == ("shm", 1 << 20)
    assert ParameterServerStrategy(num_servers=2).auto_servers is False


def test_shared_memory_for_every_pair_is_refused_when_a_process_runs_elsewhere() -> None:
    strategy = ParameterServerStrategy(transport="shm", parallel_devices=[torch.device("cpu")])
    here = HostCard.here()
    strategy._check_one_host({0: here, 1: here})  # one worker and its server on this host: fine
    elsewhere = HostCard("gpu-node-7", "a-boot-id-of-another-machine", here.pid_namespace, 4242, {})
    with pytest.raises(
        ValueError,
        match=r"`ParameterServerStrategy\(transport='shm'\)` needs every worker and server on one host, but server "
        r"rank 1 runs on 'gpu-node-7' .* Use transport='auto' \(shared memory within a host, TCP between hosts\)",
    ):
        strategy._check_one_host({0: here, 1: elsewhere})


def test_async_with_staleness_zero_is_sync_and_may_run_on_workers() -> None:
    strategy = ParameterServerStrategy(update_on="worker", mode="async", max_staleness=0)
    assert strategy._sync


def test_clipping_twice_in_one_step_is_refused_with_the_fix() -> None:
    """`update_on='server'` clips on the servers, once per step: a module that clips twice is told what to do."""
    strategy = ParameterServerStrategy(update_on="server")
    strategy._record_clipping(None, 0.5, "norm")
    assert strategy._clip_request == (0.5, True)
    with pytest.raises(ValueError, match=r"applies one gradient clipping per step.*use `update_on='worker'`"):
        strategy._record_clipping(None, 0.1, "value")
    strategy._clip_request = None
    strategy._record_clipping(None, 0.0, "norm")  # no clipping asked
    assert strategy._clip_request is None


def test_servers_spread_round_robin_over_nodes() -> None:
    assert servers_on_node(3, 1, 0) == [0, 1, 2]
    assert servers_on_node(3, 2, 0) == [0, 2]
    assert servers_on_node(3, 2, 1) == [1]
    assert servers_on_node(1, 4, 3) == []


def test_telemetry_records_steps_and_names_metrics() -> None:
    telemetry = ParameterServerTelemetry(num_servers=2, partition_bytes=[300, 100])
    record = {"exposed_seconds": 0.5, "overlapped_seconds": 1.5, "step_seconds": 2.0}
    telemetry.record_step([10, 20], [30, 40], staleness=2, **record)
    telemetry.record_step([10, 20], [30, 40], staleness=0, **record)
    assert (telemetry.steps, telemetry.bytes_pushed, telemetry.bytes_pulled) == (2, 30, 70)
    assert telemetry.total_bytes_pushed == 60
    assert telemetry.max_staleness_seen == 2
    assert telemetry.mean_staleness == 1.0
    assert telemetry.load_imbalance == pytest.approx(0.5)  # max 300 over mean 200
    assert (telemetry.comm_seconds, telemetry.compute_seconds) == (2.0, 1.5)
    metrics = telemetry.metrics()
    assert metrics["ps/comm_fraction"] == pytest.approx(0.25)  # exposed 0.5 of a 2 s step
    assert metrics["ps/comm_exposed_seconds"] == 0.5
    assert metrics["ps/comm_overlapped_seconds"] == 1.5
    assert metrics["ps/comm_overlapped_fraction"] == pytest.approx(0.75)
    assert metrics["ps/server1/bytes_pulled"] == 40.0
    assert ParameterServerTelemetry(num_servers=1).load_imbalance == 0.0


@pytest.mark.parametrize(("backend", "moved"), [("nccl", True), ("gloo", False)])
def test_collectives_move_cpu_tensors_to_the_worker_device_under_nccl(backend: str, moved: bool) -> None:
    """NCCL refuses CPU tensors (seen on an H100: a callback's CPU counter failed the all-gather)."""
    strategy = ParameterServerStrategy(process_group_backend=backend, parallel_devices=[torch.device("meta")])
    out = strategy._on_backend_device(torch.tensor([3]))
    assert out.device.type == ("meta" if moved else "cpu")


def test_a_lone_worker_reports_a_failed_collective_as_it_is() -> None:
    """With one worker there is no peer to lose: the collective's own error is not called a lost rank."""
    strategy = ParameterServerStrategy(parallel_devices=[torch.device("cpu")])
    error = RuntimeError("No backend type associated with device type cpu")
    assert strategy._collective_failed("an all-gather", error) is error


def test_gradient_norms_of_an_async_fit_are_refused_with_the_fix() -> None:
    """Asynchronous pushes are never averaged over the workers: no noise scale to measure from them."""
    strategy = ParameterServerStrategy(update_on="server", mode="async", max_staleness=None)
    strategy.measure_gradient_norms(0)  # not measuring is fine
    with pytest.raises(ValueError, match=r"this fit is asynchronous \(mode='async', max_staleness=None\)") as info:
        strategy.measure_gradient_norms(32)
    assert "Use mode='sync' (or max_staleness=0)" in str(info.value)
    assert strategy.gradient_norm_sample() is None  # before any fit
    synchronous = ParameterServerStrategy(update_on="server", mode="async", max_staleness=0)
    synchronous.measure_gradient_norms(32)
    assert isinstance(synchronous, ReportsGradientNorms)
