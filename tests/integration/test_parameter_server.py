"""Multi-process tests of ParameterServerStrategy: real worker and server processes on CPU with gloo.

The jobs are in ``scripts/parameter_server_jobs.py`` (a script: Lightning's launcher re-runs it for each worker).
One launch (``suite``) runs every equivalence case against DDP, the drop-in, checkpoint and async runs; each
failure job is its own launch, several at a time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_patterns.data.in_memory import InMemoryDataModule
from lightning_patterns.data.shards import write_dataset
from lightning_patterns.models import MLPClassifier
from lightning_patterns.testing.launch import free_port, launch_env, run_nodes, torchrun_command
from lightning_patterns.testing.tiny_job import TinyJob, single_process_reference

SCRIPT = Path(__file__).resolve().parent / "scripts" / "parameter_server_jobs.py"
JOB = TinyJob(steps=4, batch=4, workers=2)
STEPS, WORKERS = JOB.steps, JOB.workers
#: Equivalence cases that every placement must run exactly as DDP, and those one placement refuses.
EXACT = {
    "frozen_adamw": ("worker", "server"),
    "frozen_sgd": ("worker", "server"),
    "two_groups": ("worker", "server"),
    "one_cycle": ("worker", "server"),
    "plateau": ("worker", "server"),
    "accumulate_clip": ("worker", "server"),
    "tied_clip_value": ("worker", "server"),
    "batchnorm": ("worker", "server"),
    "mixed16": ("worker", "server"),
    "adafactor": ("worker",),
    "lbfgs": ("worker",),
    "async_staleness_0": ("server",),
}
TRANSPORTS = ("shm", "tcp")
RUNS = [
    (case, placement, servers, transport)
    for case, places in EXACT.items()
    for placement in places
    for servers in (1, 2)
    for transport in TRANSPORTS
]
ELEMENTWISE_REFUSAL = "runs the optimizer on chunks of parameters"


def _launch(
    job: str, out: Path, timeout: float, *args: str, torchrun: bool = False, package: str = "pytorch_lightning"
) -> subprocess.CompletedProcess[str]:
    """Run a job with Lightning's own launcher, or under torchrun (Lightning's TorchElasticEnvironment)."""
    port = free_port()
    launcher = torchrun_command(port, WORKERS) if torchrun else [sys.executable]
    return subprocess.run(
        [*launcher, str(SCRIPT), job, "--out", str(out), *args],
        env={**launch_env(port), "LIGHTNING_PATTERNS_LIGHTNING": package},
        cwd=out,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: Samples of the dataset AdaptiveBatchSize streams in the suite.
ADAPTIVE_SAMPLES = 640


class _Samples:
    """4×4 images of four classes, each with its index (to check that every sample comes once)."""

    def __len__(self) -> int:
        return ADAPTIVE_SAMPLES

    def __getitem__(self, i: int) -> dict[str, object]:
        image = (np.random.default_rng(i).normal(size=(4, 4)) + i % 4).astype(np.float32)
        return {"index": np.int64(i), "image": image, "label": np.int64(i % 4)}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch runs every training scenario in turn (starting processes dominates the cost on 2 cores)."""
    out = tmp_path_factory.mktemp("parameter_server_suite")
    write_dataset(_Samples(), str(out / "adaptive_data"), num_shards=3, progress=False)
    result = _launch("suite", out, timeout=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


def _assert_equal(actual: Any, expected: Any, where: str) -> None:
    """Tensors within 1e-5 (NaN is a difference), everything else equal, recursively."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.shape == expected.shape, where
        torch.testing.assert_close(
            actual.float(), expected.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}"
        )
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_equal(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-8), where
    else:
        assert actual == expected, where


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "update_on", "servers", "transport"), RUNS, ids=[f"{c}-{p}-s{s}-{t}" for c, p, s, t in RUNS]
)
def test_equals_ddp(suite: Path, case: str, update_on: str, servers: int, transport: str) -> None:
    """Parameters and buffers of both workers, rank 0's optimizer state (and GradScaler) equal DDP's on the same job.

    Over each transport: the workers and servers of the launch share one host, so ``"shm"`` moves every gradient and
    parameter through shared memory and ``"tcp"`` through gloo.
    """
    label = f"{case}_{update_on}_s{servers}_{transport}"
    for rank in range(WORKERS):
        actual = _load(suite / f"{label}_rank{rank}.pt")
        expected = _load(suite / f"{case}_ddp_rank{rank}.pt")
        assert actual["transports"] == [transport] * servers
        assert actual["global_step"] == expected["global_step"] > 0
        _assert_equal(actual["state_dict"], expected["state_dict"], f"rank {rank} state_dict")
        _assert_equal(actual["scaler"], expected["scaler"], f"rank {rank} scaler")
        if rank == 0:
            if case == "lbfgs":
                _assert_lbfgs_sees_the_mean_loss(
                    actual["optimizer"], [_load(suite / f"{case}_ddp_rank{r}.pt") for r in (0, 1)]
                )
            _assert_equal(actual["optimizer"], expected["optimizer"], "optimizer")
        if update_on == "server":
            assert actual["worker_state_len"] == 0, "with update_on='server' a worker's optimizer holds no state"


def _assert_lbfgs_sees_the_mean_loss(actual: dict[str, Any], ddp: list[dict[str, Any]]) -> None:
    """LBFGS's loss is the workers' mean (DDP hands each rank its own); then its state is DDP's."""
    losses = [record["optimizer"]["state"][0]["prev_loss"] for record in ddp]
    assert losses[0] != losses[1]
    assert actual["state"][0]["prev_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    actual["state"][0]["prev_loss"] = ddp[0]["optimizer"]["state"][0]["prev_loss"]


@pytest.mark.distributed
@pytest.mark.slow
def test_the_cases_test_what_they_claim(suite: Path) -> None:
    """The DDP references really contain what each case is about."""
    frozen = _load(suite / "frozen_adamw_ddp_rank0.pt")
    torch.testing.assert_close(frozen["state_dict"]["frozen.weight"], _initial_frozen_weight(), rtol=0, atol=0)
    # Parameters: net.0.weight, net.0.bias, net.2.weight, net.2.bias, frozen.weight, frozen.bias, extra.weight, ...
    assert {4, 5}.isdisjoint(frozen["optimizer"]["state"]), "the frozen layer never had a gradient"
    # No worker uses the extra branch at batch 1: AdamW skipped it there, so its step count is 3 of 4.
    assert int(frozen["optimizer"]["state"][6]["step"]) == 3
    one_cycle = _load(suite / "one_cycle_ddp_rank0.pt")["optimizer"]["param_groups"][0]
    assert one_cycle["momentum"] not in (0.8, 0.95)  # cycled between them
    plateau = _load(suite / "plateau_ddp_rank0.pt")["optimizer"]["param_groups"][0]
    assert plateau["lr"] == pytest.approx(0.05 / 4)  # halved after epochs 1 and 2
    mixed = _load(suite / "mixed16_ddp_rank0.pt")["scaler"]
    assert mixed["scale"] < 2.0**20, "the first steps overflowed float16 and were skipped"
    bn = [_load(suite / f"batchnorm_ddp_rank{r}.pt")["state_dict"]["net.1.running_mean"] for r in range(WORKERS)]
    assert not torch.equal(bn[0], bn[1]), "rank 1's running statistics are its own after its last step"
    # DDP on the two-group SGD job is plain training on the concatenated batches.
    expected_model, _ = single_process_reference("sgd", JOB)
    _assert_equal(_load(suite / "two_groups_ddp_rank0.pt")["state_dict"], expected_model, "two_groups ddp")


def _initial_frozen_weight() -> torch.Tensor:
    """The frozen layer's weight as the `frozen_*` cases' module initialises it."""
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return torch.nn.Linear(4, 4).weight.detach()


@pytest.mark.distributed
@pytest.mark.slow
def test_refusals_at_setup_name_the_fix(suite: Path) -> None:
    refusals = json.loads((suite / "refusals.json").read_text())
    for servers in (1, 2):
        for transport in TRANSPORTS:
            run = f"s{servers}_{transport}"
            for case in ("adafactor", "lbfgs"):
                assert ELEMENTWISE_REFUSAL in refusals[f"{case}_server_{run}"]
                assert "update_on='worker'" in refusals[f"{case}_server_{run}"]
            assert "torch.optim.Adafactor is not one of them" in refusals[f"adafactor_server_{run}"]
            assert "torch.optim.lbfgs.LBFGS is not one of them" in refusals[f"lbfgs_server_{run}"]
            for update_on in ("worker", "server"):
                message = refusals[f"batchnorm_sync_{update_on}_{run}"]
                assert "SyncBatchNorm, which runs on GPUs only" in message
                assert "drop `sync_batchnorm=True`" in message
            own = refusals[f"own_precision_server_{run}"]
            assert "_OwnPrecision steps in its own way" in own
            assert "update_on='worker'" in own
    assert len(refusals) == 2 * 2 * (2 + 2 + 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_the_servers_of_one_launch_serve_all_its_fits(suite: Path) -> None:
    """The equivalence suite's 90-odd fits start servers twice: once for 1 server, once for 2 (both transports)."""
    timings = json.loads((suite / "timings.json").read_text())
    assert timings["sessions_opened"] == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_auto_servers_follow_the_cost_model_and_train_exactly(suite: Path) -> None:
    record = json.loads((suite / "auto.json").read_text())
    # S_max on one node: max(2, cores // workers), at most 8.
    assert 1 <= record["num_servers"] <= max(2, min(8, (os.cpu_count() or 1) // WORKERS))
    assert f"Recommended: PS S={record['num_servers']} update_on=server" in record["plan"]
    expected_model, _ = single_process_reference("sgd", JOB)
    for rank in range(WORKERS):
        actual = _load(suite / f"auto_rank{rank}.pt")
        assert actual["transports"] == ["shm"] * record["num_servers"]
        _assert_equal(actual["state_dict"], expected_model, f"rank {rank} state_dict")


@pytest.mark.distributed
@pytest.mark.slow
def test_async_reports_the_staleness_it_saw_and_ssp_bounds_it(suite: Path) -> None:
    # Rank 1 is slowed down. Fully async, rank 0 runs all its steps ahead: rank 1's pushes are very stale.
    free = _load(suite / "async_none_rank1.pt")["telemetry"]
    assert free.steps == STEPS
    assert free.max_staleness_seen >= STEPS - 1
    # With max_staleness=1 no worker gets more than one step ahead, so each push of rank 1 is at most
    # (workers - 1) * (1 + 1) = 2 updates stale.
    bounded = _load(suite / "async_s1_rank1.pt")["telemetry"]
    assert bounded.steps == STEPS
    assert 1 <= bounded.max_staleness_seen <= 2
    assert _load(suite / "async_s1_rank0.pt")["worker_state_len"] == 0


@pytest.mark.distributed
@pytest.mark.slow
def test_drop_in_mlp_with_validation_accumulation_clipping_and_telemetry(suite: Path) -> None:
    record = _load(suite / "dropin_s1_e1.pt")
    # 512 samples / 2 workers / 32 per batch = 8 batches; accumulate 2 -> 4 optimizer steps.
    assert record["global_step"] == 4
    assert {"val_loss", "val_acc", "train_loss_epoch"} <= record["metrics"].keys()
    assert record["worker_state_len"] == 0
    telemetry = record["telemetry"]
    theory = 2 * 4 * record["num_params"]  # push float32 gradients + pull float32 parameters
    per_step = telemetry.bytes_pushed + telemetry.bytes_pulled
    assert abs(per_step - theory) / theory < 0.05
    assert telemetry.total_bytes_pushed == telemetry.steps * telemetry.bytes_pushed
    metrics = (suite / "dropin_s1_e1" / "version_0" / "metrics.csv").read_text()
    for column in (
        "ps/bytes_pushed",
        "ps/server0/bytes_pulled",
        "ps/comm_fraction",
        "ps/load_imbalance",
        "ps/staleness",
    ):
        assert column in metrics


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_holds_everything_and_resumes_with_another_server_count(suite: Path) -> None:
    checkpoint = _load(suite / "dropin_s1_e1_ckpt" / "last.ckpt")
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert set(optimizer_state["state"]) == {0, 1, 2, 3}
    for index, state in optimizer_state["state"].items():
        assert state["momentum_buffer"].shape == checkpoint["state_dict"][list(checkpoint["state_dict"])[index]].shape
    # Resumed under 2 servers: the servers got back exactly the state the checkpoint holds.
    resumed = _load(suite / "dropin_s2_e2.pt")
    assert resumed["start_step"] == 4
    assert resumed["global_step"] == 8
    for index, state in optimizer_state["state"].items():
        _assert_equal(resumed["start_optimizer_state"]["state"][index], state, f"state {index}")
    assert resumed["telemetry"].partition_bytes == [50900, 50900]


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_loads_into_a_plain_single_process_trainer(suite: Path, tmp_path: Path) -> None:
    model = MLPClassifier(hidden_dim=32, num_layers=1, lr=0.01, optimizer="sgd", momentum=0.9)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = InMemoryDataModule(train_samples=64, val_samples=32, batch_size=32, seed=0)
    # Lightning points out that the checkpoint was written by a ModelCheckpoint this Trainer lacks: expected.
    with pytest.warns(UserWarning, match="callbacks used to create the checkpoint"):
        trainer.fit(model, datamodule=data, ckpt_path=suite / "dropin_s1_e1_ckpt" / "last.ckpt")
    assert trainer.global_step == 4 + 2
    assert len(trainer.optimizers[0].state) == 4  # the plain optimizer took over the momentum buffers


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_under_torchrun_match_single_process_training(tmp_path: Path) -> None:
    """Two torchrun agents as two nodes (one worker and one server each) on 127.0.0.1, under `lightning`."""
    env = {"LIGHTNING_PATTERNS_LIGHTNING": "lightning"}
    nodes = run_nodes([str(SCRIPT), "two_nodes", "--out", str(tmp_path)], nnodes=2, timeout=180, cwd=tmp_path, env=env)
    assert [code for code, _ in nodes] == [0, 0], "\n".join(log[-6000:] for _, log in nodes)
    result = _load(tmp_path / "two_nodes_rank0.pt")
    expected_model, expected_optimizer = single_process_reference("sgd", JOB)
    _assert_equal(result["state_dict"], expected_model, "state_dict")
    _assert_equal(result["optimizer"]["state"], expected_optimizer["state"], "optimizer state")
    # Two servers (server s runs on node s % 2) shared the 58 float32 parameters between them.
    partition = result["telemetry"].partition_bytes
    assert len(partition) == 2
    assert min(partition) > 0
    assert sum(partition) == 58 * 4


# -- gradient noise scale and adaptive batch size --------------------------------------------------------------------
NORM_RUNS = [
    (update_on, servers, transport)
    for update_on in ("worker", "server")
    for servers in (1, 2)
    for transport in TRANSPORTS
]


def _expected_norms(local: list[list[list[tuple[int, list[float]]]]], step: int) -> list[float]:
    """The step's norms recomputed from each worker's micro-batch gradients: (small², b_small, big², b_big)."""
    grads, batches = [], []
    for worker in local:
        micro = worker[step]
        # Lightning divides each micro-batch's loss by the accumulation: the step's gradient is their mean.
        grads.append(np.mean([np.asarray(g, dtype=np.float64) for _, g in micro], axis=0))
        batches.append(sum(samples for samples, _ in micro))
    average = np.mean(grads, axis=0)
    harmonic = 1 / np.mean([1 / b for b in batches])
    return [float(np.mean([g @ g for g in grads])), harmonic, float(average @ average), len(grads) * harmonic]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("update_on", "servers", "transport"), NORM_RUNS, ids=[f"{p}-s{s}-{t}" for p, s, t in NORM_RUNS]
)
def test_gradient_norms_are_the_workers_own_and_their_average(
    suite: Path, update_on: str, servers: int, transport: str
) -> None:
    """What the strategy reports equals the norms of the workers' local gradients, on every worker alike.

    Each step accumulates two micro-batches (of 4 samples on rank 0, 6 on rank 1) and clips the gradient hard; with
    one server the fit also runs 16-bit mixed precision, whose GradScaler scales what the workers push by 2¹⁰.
    """
    label = f"norms_{update_on}_s{servers}_{transport}"
    records = [json.loads((suite / f"{label}_rank{rank}.json").read_text()) for rank in range(WORKERS)]
    assert records[0]["reported"] == records[1]["reported"]  # exactly the same floats on every worker
    local = [record["local"] for record in records]
    assert len(records[0]["reported"]) == 3
    for step, reported in enumerate(records[0]["reported"]):
        expected = _expected_norms(local, step)
        assert reported == pytest.approx(expected, rel=1e-5), f"step {step}"
        assert reported[1] == pytest.approx(2 / (1 / 8 + 1 / 12))  # the harmonic mean of 2 × 4 and 2 × 6 samples
    for record in records:
        assert record["source"] == "strategy"
        assert record["noise_scale"] is not None
        # update_on="server": the servers' step is the optimizer's; its step hooks run around it as on a worker.
        assert record["hook_calls"] == [3, 3]
    with (suite / label / "version_0" / "metrics.csv").open() as rows:
        logged = [float(row["gns/noise_scale"]) for row in csv.DictReader(rows) if row.get("gns/noise_scale")]
    assert logged
    assert all(math.isfinite(value) and value >= 0 for value in logged)


@pytest.mark.distributed
@pytest.mark.slow
def test_adaptive_batch_size_changes_mid_epoch_on_every_worker_with_each_sample_once(suite: Path) -> None:
    """AdaptiveBatchSize (update_on="server") on ShardedStreamingDataModule, as under DDP (test_adaptive_ddp.py)."""
    records = [json.loads((suite / f"adaptive_rank{rank}.json").read_text()) for rank in range(WORKERS)]
    assert records[0]["decisions"] == records[1]["decisions"]
    assert all(record["source"] == "strategy" for record in records)
    decision = records[0]["decisions"][0]
    micro = decision["micro_batch_size"]
    assert (micro, decision["accumulation"]) == (32, 1)  # 2 workers × 32 = min_batch_size 64
    switches = [next(row[1] for row in record["rows"] if row[2] != 16) for record in records]
    assert switches[0] == switches[1]
    per_rank_epoch = [[row for row in record["rows"] if row[0] == 0] for record in records]
    assert 0 < switches[0] < len(per_rank_epoch[0]) - 1, "the switch came in the middle of the first epoch"
    assert len(per_rank_epoch[0]) == len(per_rank_epoch[1])
    assert all(row[2] == micro for rows in per_rank_epoch for row in rows[switches[0] : -1])
    for epoch in (0, 1):
        seen = Counter(i for record in records for row in record["rows"] if row[0] == epoch for i in row[4])
        assert seen == Counter(range(ADAPTIVE_SAMPLES)), f"epoch {epoch}: each sample once across both workers"


# -- failures --------------------------------------------------------------------------------------------------------
#: (job, extra arguments, Lightning package): rank 1 raises, with and without `sync_dist`, sync and async, S = 1, 2;
#: then the two kill jobs.
FAILURES = [
    ("raise", (f"--servers={servers}", f"--mode={mode}", *(("--sync-dist",) if sync_dist else ())), package)
    for servers, mode, sync_dist, package in (
        (1, "sync", False, "pytorch_lightning"),
        (2, "sync", False, "lightning"),
        (1, "sync", True, "lightning"),
        (2, "sync", True, "pytorch_lightning"),
        (1, "async", False, "lightning"),
        (2, "async", False, "pytorch_lightning"),
        (1, "async", True, "pytorch_lightning"),
        (2, "async", True, "lightning"),
    )
] + [("kill_worker", ("--servers=1",), "pytorch_lightning"), ("kill_server", ("--servers=1",), "lightning")]
TIMEOUT = 20.0  # the strategy's, in the failure jobs
#: Teardown after the failure is seen (Lightning's, the launcher's) on a loaded 2-core machine.
SLACK = 15.0


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], float]]:
    """Every failure job, three at a time (each mostly waits for its processes to start)."""

    def run(index: int) -> tuple[subprocess.CompletedProcess[str], float]:
        job, args, package = FAILURES[index]
        out = tmp_path_factory.mktemp(f"failure{index}")
        result = _launch(job, out, 120, *args, torchrun=job == "kill_server", package=package)
        return result, time.time()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(len(FAILURES))))
    return {_failure_id(index): result for index, result in enumerate(results)}


def _failure_id(index: int) -> str:
    job, args, package = FAILURES[index]
    return "-".join([job, *(a.lstrip("-") for a in args), package])


def _server_ranks(args: tuple[str, ...]) -> list[int]:
    servers = int(next(a for a in args if a.startswith("--servers=")).split("=")[1])
    return [WORKERS + s for s in range(servers)]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FAILURES)), ids=[_failure_id(i) for i in range(len(FAILURES))])
def test_a_failed_process_stops_every_other_one(
    failures: dict[str, tuple[subprocess.CompletedProcess[str], float]], index: int
) -> None:
    """Every process exits non-zero within the timeout; the survivors name the failed rank and, if known, its error."""
    job, args, _ = FAILURES[index]
    result, ended = failures[_failure_id(index)]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    marker = {"raise": "RAISED ", "kill_worker": "KILLED ", "kill_server": "KILLED "}[job]
    failed_at = float(output.split(marker)[1].split()[0])
    # Within the strategy's timeout (in practice the failure is seen at once), plus teardown on a loaded machine.
    assert ended - failed_at < TIMEOUT + SLACK, output[-6000:]
    if job.startswith("kill"):
        _assert_no_shared_memory_survives(output)
    if job == "kill_server":  # both workers saw the server's connection close
        for rank in range(WORKERS):
            assert f"[rank{rank}]: lightning_patterns.exceptions.PeerLostError: Lost rank 2" in output, output[-6000:]
        return
    # Rank 0 stopped with our error, naming rank 1 (and its exception when it raised), before anything else could
    # stop it (Lightning's launcher kills rank 0 five seconds after rank 1 exits).
    error = next((line for line in output.splitlines() if "PeerFailedError" in line and "Worker rank 0" in line), "")
    assert "rank 1" in error, output[-6000:]
    if job == "raise":
        assert "RuntimeError: boom at step 3 on rank 1" in error, output[-6000:]
    for server in _server_ranks(args):
        assert f"[server rank {server}] ERROR exiting with code 1" in output, output[-6000:]


def _assert_no_shared_memory_survives(output: str) -> None:
    """The killed job moved its tensors through shared memory, and once its processes exited none of it is left."""
    shared = output.split("SHARED ")[1].splitlines()[0].split()
    # A push and a reply region per server (S = 1): the transport really was shared memory.
    assert len(shared) >= 2, output[-6000:]
    assert all(name.startswith("lp-ps-") for name in shared)
    still_mapped = []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # a process that exited meanwhile
            continue
        still_mapped += [f"{maps.parent.name}: {name}" for name in shared if f"memfd:{name}" in text]
    assert not still_mapped, still_mapped
    assert not [entry.name for entry in Path("/dev/shm").iterdir() if "lp-ps" in entry.name]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_server_that_fails_to_start_is_reported_within_five_seconds(tmp_path: Path) -> None:
    result = _launch("start_failure", tmp_path, 120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "this torch is broken on purpose" in output  # the server's own traceback
    assert "ServerStartError: Parameter server rank 2" in output
    assert "exited with code 1 while the job was starting" in output
    seconds = float(output.split("START FAILURE REPORTED AFTER ")[1].split()[0])
    assert seconds < 5.0, output[-4000:]
