"""The planner: a real module profiled in-process, this machine's links, the table and its recommendation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server.cost_model import Cluster, Workload
from lightning_patterns.strategies.parameter_server.planner import (
    choose_servers,
    count_buckets,
    format_plan,
    measure_links,
    plan,
    profile_module,
)
from lightning_patterns.testing.tiny_job import TinyJob


def test_a_module_is_profiled_from_a_few_real_steps(lightning_package: Any) -> None:
    pl = lightning_package.pl
    module = lightning_package.classes.TinyRegressor("adam", TinyJob(steps=40, batch=4, workers=1))
    workload, numels, itemsizes = profile_module(
        module,
        lambda **kwargs: pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs
        ),
        lambda trainer, m: trainer.fit(m),
        pl.Callback,
        steps=4,
    )
    assert numels == [p.numel() for p in module.parameters()]
    assert itemsizes == [4] * len(numels)
    assert workload.model_bytes == 4 * sum(numels)
    assert workload.compute_seconds > 0
    assert workload.optimizer_seconds > 0
    assert workload.server_update_seconds > 0
    assert 0 < workload.backward_fraction <= 1


def test_too_few_steps_to_profile_say_what_to_do(lightning_package: Any) -> None:
    pl = lightning_package.pl
    module = lightning_package.classes.TinyRegressor("sgd", TinyJob(steps=4, batch=4, workers=1))
    with pytest.raises(RuntimeError, match=r"Profiling ran 2 steps, fewer than the 8 needed: give the module more"):
        profile_module(
            module,
            lambda **kwargs: pl.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                max_epochs=1,
                limit_train_batches=2,
                **kwargs,
            ),
            lambda trainer, m: trainer.fit(m),
            pl.Callback,
            steps=5,
        )


def test_links_are_measured_between_two_real_processes() -> None:
    links = measure_links(1 << 20)
    assert set(links) == {"copy_bandwidth", "sum_bandwidth", "tcp_bandwidth", "tcp_latency", "ring_bandwidth"}
    assert all(value > 0 for value in links.values())
    assert links["tcp_latency"] < 1.0


def test_buckets_follow_the_strategys_plan() -> None:
    # Two 4 MiB tensors and a small one, 25 MiB buckets, the one backward fills first of 1 MiB at most.
    numels = [1 << 20, 1 << 20, 10]
    assert count_buckets(numels, [4, 4, 4], 1) == 2  # the small tensor alone, then both large ones
    # Two servers split the second tensor: on each, its last piece alone, then the rest.
    assert count_buckets(numels, [4, 4, 4], 2) == 4


def test_the_plan_recommends_the_fastest_and_says_when_ddp_wins() -> None:
    workload = Workload(model_bytes=1e8, compute_seconds=0.1, optimizer_seconds=0.02, server_update_seconds=0.02)
    cluster = Cluster(workers=2, cores=2, copy_bandwidth=5e9, sum_bandwidth=5e9, tcp_bandwidth=6e8)
    result = plan(workload, cluster, max_servers=2)
    assert [row.label for row in result.rows] == [
        "DDP",
        "PS S=1 update_on=worker",
        "PS S=1 update_on=server",
        "PS S=2 update_on=worker",
        "PS S=2 update_on=server",
    ]
    best = result.best
    assert best.prediction.step_seconds == min(r.prediction.step_seconds for r in result.rows if r.servers)
    text = format_plan(result)
    assert f"Recommended: {best.label}" in text
    assert ("DDP is predicted faster" in text) == result.ddp_faster
    fast_network = Cluster(workers=2, cores=2, copy_bandwidth=1e8, sum_bandwidth=1e8, tcp_bandwidth=1e11)
    assert plan(workload, fast_network, max_servers=2).ddp_faster


def test_auto_servers_choose_within_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    servers, result = choose_servers(4e6, Cluster(workers=2, cores=2), max_servers=3, update_on="server")
    assert 1 <= servers <= 3
    assert servers == result.best.servers
    assert {row.update_on for row in result.rows if row.servers} == {"server"}
    assert torch.get_num_threads() >= 1
