"""Multi-process tests of ParameterServerStrategy: real worker and server processes on CPU with gloo.

This file is also the script those tests run (``python test_parameter_server.py <scenario> ...``):
Lightning's popen launcher re-runs the script for each extra worker, which it cannot do for pytest.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_patterns.testing.launch import free_port, launch_env, run_nodes, torchrun_command
from lightning_patterns.testing.tiny_job import TinyJob, TinyRegressor, single_process_reference

SCRIPT = Path(__file__).resolve()
JOB = TinyJob(steps=4, batch=4, workers=2)
STEPS, WORKERS = JOB.steps, JOB.workers


# -- scenarios run as scripts ----------------------------------------------------------------------------------
class _Capture(pl.Callback):
    """On rank 0, after the last step: the worker optimizer's state size and the gathered server state."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != trainer.max_steps:
            return
        optimizer = trainer.optimizers[0]
        worker_state = len(optimizer.state)
        gathered = trainer.strategy.optimizer_state(optimizer)
        telemetry = trainer.strategy.telemetry  # type: ignore[attr-defined]
        if trainer.global_rank == 1:
            torch.save({"telemetry": telemetry}, self.out.with_name(self.out.stem + "_rank1.pt"))
        if trainer.global_rank == 0:
            torch.save(
                {
                    "state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "optimizer_state": gathered,
                    "worker_state_len": worker_state,
                    "telemetry": telemetry,
                },
                self.out,
            )


# -- the tests -------------------------------------------------------------------------------------------------------
def _run_script(scenario: str, out: Path, timeout: float, torchrun: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a scenario with Lightning's own launcher, or under torchrun (Lightning's TorchElasticEnvironment)."""
    port = free_port()
    launcher = torchrun_command(port, WORKERS) if torchrun else [sys.executable]
    return subprocess.run(
        [*launcher, str(SCRIPT), scenario, "--out", str(out)],
        env=launch_env(port),
        cwd=out,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch runs every training scenario in turn (starting processes dominates the cost on 2 cores)."""
    out = tmp_path_factory.mktemp("parameter_server_suite")
    result = _run_script("suite", out, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "optimizer"), [("eq_sgd_s1", "sgd"), ("eq_sgd_s2", "sgd"), ("eq_adam_s1", "adam"), ("eq_adam_s2", "adam")]
)
def test_sync_matches_single_process_training(suite: Path, name: str, optimizer: str) -> None:
    """2 workers × 1 and × 2 servers; SGD with momentum and two param groups, Adam with StepLR stepped every step.

    ``eq_adam_s1`` runs ``mode="async", max_staleness=0``, which must be exactly sync.
    """
    result = torch.load(suite / f"{name}.pt", weights_only=False)
    expected_model, expected_optimizer = single_process_reference(optimizer, JOB)
    _assert_close(result["state_dict"], expected_model)
    # The state gathered from the servers is laid out exactly like the single-process optimizer's.
    gathered = result["optimizer_state"]
    assert gathered["param_groups"] == expected_optimizer["param_groups"]
    assert gathered["state"].keys() == expected_optimizer["state"].keys()
    for index, state in expected_optimizer["state"].items():
        _assert_close(gathered["state"][index], state)
    assert result["worker_state_len"] == 0, "a worker's optimizer must hold no state"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_under_torchrun_match_single_process_training(tmp_path: Path) -> None:
    """Two torchrun agents as two nodes (one worker and one server each) on 127.0.0.1, as across machines."""
    out = tmp_path / "two_nodes.pt"
    nodes = run_nodes([str(SCRIPT), "two_nodes", "--out", str(out)], nnodes=2, timeout=180, cwd=tmp_path)
    assert [code for code, _ in nodes] == [0, 0], "\n".join(log[-6000:] for _, log in nodes)
    result = torch.load(out, weights_only=False)
    expected_model, expected_optimizer = single_process_reference("sgd", JOB)
    _assert_close(result["state_dict"], expected_model)
    for index, state in expected_optimizer["state"].items():
        _assert_close(result["optimizer_state"]["state"][index], state)
    # Two servers (server s runs on node s % 2) shared the 58 float32 parameters between them.
    partition = result["telemetry"].partition_bytes
    assert len(partition) == 2
    assert min(partition) > 0
    assert sum(partition) == 58 * 4


@pytest.mark.distributed
@pytest.mark.slow
def test_drop_in_mlp_with_validation_accumulation_clipping_and_telemetry(suite: Path) -> None:
    record = torch.load(suite / "dropin_s1_e1.pt", weights_only=False)
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
    checkpoint = torch.load(suite / "dropin_s1_e1_ckpt" / "last.ckpt", weights_only=False)
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert set(optimizer_state["state"]) == {0, 1, 2, 3}
    for index, state in optimizer_state["state"].items():
        assert state["momentum_buffer"].shape == checkpoint["state_dict"][list(checkpoint["state_dict"])[index]].shape
    # Resumed under 2 servers: the servers got back exactly the state the checkpoint holds.
    resumed = torch.load(suite / "dropin_s2_e2.pt", weights_only=False)
    assert resumed["start_step"] == 4
    assert resumed["global_step"] == 8
    for index, state in optimizer_state["state"].items():
        _assert_close(resumed["start_optimizer_state"]["state"][index], state)
    assert resumed["telemetry"].partition_bytes == [50900, 50900]


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_loads_into_a_plain_single_process_trainer(suite: Path, tmp_path: Path) -> None:
    from lightning_patterns.data.in_memory import InMemoryDataModule
    from lightning_patterns.models import MLPClassifier

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
def test_async_reports_the_staleness_it_saw_and_ssp_bounds_it(suite: Path) -> None:
    # Rank 1 is slowed down. Fully async, rank 0 runs all its steps ahead: rank 1's pushes are very stale.
    free = torch.load(suite / "async_none_rank1.pt", weights_only=False)["telemetry"]
    assert free.steps == STEPS
    assert free.max_staleness_seen >= STEPS - 1
    # With max_staleness=1 no worker gets more than one step ahead, so each push of rank 1 is at most
    # (workers - 1) * (1 + 1) = 2 updates stale.
    bounded = torch.load(suite / "async_s1_rank1.pt", weights_only=False)["telemetry"]
    assert bounded.steps == STEPS
    assert 1 <= bounded.max_staleness_seen <= 2
    assert torch.load(suite / "async_s1.pt", weights_only=False)["worker_state_len"] == 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("victim", "lost_rank", "torchrun"), [("worker", 1, False), ("server", 2, True)])
def test_a_lost_process_stops_every_other_one_with_peer_lost_error(
    tmp_path: Path, victim: str, lost_rank: int, torchrun: bool
) -> None:
    """Kill worker 1 (Lightning's launcher) or the server (under torchrun): the others stop, naming the rank."""
    result = _run_script(f"kill_{victim}", tmp_path, timeout=90, torchrun=torchrun)
    ended = time.time()
    assert result.returncode != 0
    killed_at = float(result.stdout.split("KILLED ")[1].split()[0])
    # Within the strategy's timeout (20 s; in practice the loss is seen at once), plus the time the launcher
    # (torchrun or Lightning's) takes to tear the surviving processes down on a loaded 2-core machine.
    assert ended - killed_at < 20.0 + 15.0
    assert "PeerLostError" in result.stderr
    assert f"rank {lost_rank}" in result.stderr
    if victim == "worker":  # the server saw it first and told worker 0
        assert f"[server rank 2] ERROR PeerLostError: Lost rank {lost_rank}" in result.stderr
    else:  # both workers saw it
        for rank in range(WORKERS):
            assert f"[rank{rank}]: lightning_patterns.exceptions.PeerLostError: Lost rank 2" in result.stderr


# -- helpers for the scripts ------------------------------------------------------------------------------------------
def _trainer(strategy: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": WORKERS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(strategy=strategy, **{**defaults, **kwargs})


def run_equivalence(
    out: Path, servers: int, optimizer: str, mode: str = "sync", staleness: int | None = 0, **trainer_kwargs: Any
) -> None:
    from lightning_patterns.strategies import ParameterServerStrategy

    strategy = ParameterServerStrategy(num_servers=servers, mode=mode, max_staleness=staleness, timeout=30.0)
    trainer = _trainer(strategy, max_steps=STEPS, callbacks=[_Capture(out)], **trainer_kwargs)
    trainer.fit(TinyRegressor(optimizer, JOB))


class _SlowRank1(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 1:
            time.sleep(0.1)


def run_async(out: Path, servers: int, staleness: int | None) -> None:
    from lightning_patterns.strategies import ParameterServerStrategy

    strategy = ParameterServerStrategy(num_servers=servers, mode="async", max_staleness=staleness, timeout=30.0)
    trainer = _trainer(strategy, max_steps=STEPS, callbacks=[_Capture(out), _SlowRank1()])
    trainer.fit(TinyRegressor("sgd", JOB))


class _Record(pl.Callback):
    """Rank 0 writes what the drop-in test checks: metrics, worker optimizer state, telemetry, restored state."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = trainer.strategy.optimizer_state(trainer.optimizers[0])
        self.record["start_step"] = trainer.global_step
        self.record["start_optimizer_state"] = state
        self.record["num_params"] = sum(p.numel() for p in pl_module.parameters())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["worker_state_len"] = len(trainer.optimizers[0].state)
        self.record["telemetry"] = trainer.strategy.telemetry  # type: ignore[attr-defined]
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.record["global_step"] = trainer.global_step
        if trainer.global_rank == 0:
            torch.save(self.record, self.out)


def run_dropin(out_dir: Path, servers: int, resume: Path | None = None, max_epochs: int = 1) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from lightning_patterns.data.in_memory import InMemoryDataModule
    from lightning_patterns.models import MLPClassifier
    from lightning_patterns.strategies import ParameterServerStrategy

    pl.seed_everything(0)
    name = f"dropin_s{servers}_e{max_epochs}"
    trainer = _trainer(
        ParameterServerStrategy(num_servers=servers, timeout=30.0),
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        log_every_n_steps=1,
        logger=CSVLogger(out_dir, name=name),
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=out_dir / f"{name}_ckpt", save_last=True), _Record(out_dir / f"{name}.pt")],
    )
    model = MLPClassifier(hidden_dim=32, num_layers=1, lr=0.01, optimizer="sgd", momentum=0.9)
    data = InMemoryDataModule(train_samples=512, val_samples=128, batch_size=32, seed=0)
    trainer.fit(model, datamodule=data, ckpt_path=resume)


class _Kill(pl.Callback):
    """At step 3, rank 1 kills itself (``victim="worker"``) or rank 0 kills server 0 (``victim="server"``)."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(0.02)
        if trainer.global_step != 3:
            return
        if self.victim == "worker" and trainer.global_rank == 1:
            print(f"KILLED {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.victim == "server" and trainer.global_rank == 0:
            server = trainer.strategy._servers[0]  # type: ignore[attr-defined]
            print(f"KILLED {time.time()}", flush=True)
            os.kill(server.pid, signal.SIGKILL)
            server.join()


def run_kill(victim: str) -> None:
    from lightning_patterns.strategies import ParameterServerStrategy

    strategy = ParameterServerStrategy(num_servers=1, timeout=20.0)
    trainer = _trainer(strategy, max_steps=10_000, callbacks=[_Kill(victim)])
    trainer.fit(TinyRegressor("sgd", JOB))


def run_suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    run_equivalence(out / "eq_sgd_s1.pt", 1, "sgd")
    run_equivalence(out / "eq_sgd_s2.pt", 2, "sgd")
    run_equivalence(out / "eq_adam_s1.pt", 1, "adam", mode="async", staleness=0)  # s = 0 is sync
    run_equivalence(out / "eq_adam_s2.pt", 2, "adam")
    run_dropin(out, servers=1)
    run_dropin(out, servers=2, resume=out / "dropin_s1_e1_ckpt" / "last.ckpt", max_epochs=2)
    run_async(out / "async_none.pt", 2, None)
    run_async(out / "async_s1.pt", 1, 1)


def main() -> None:
    torch.set_num_threads(1)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if args.scenario == "suite":
        run_suite(args)
    elif args.scenario in ("kill_worker", "kill_server"):
        run_kill(args.scenario.removeprefix("kill_"))
    elif args.scenario == "two_nodes":  # one worker per node, under torchrun
        run_equivalence(Path(args.out), 2, "sgd", devices=1, num_nodes=2)
    elif args.scenario == "equivalence":
        run_equivalence(Path(args.out), args.servers, args.optimizer)


if __name__ == "__main__":
    main()
