"""Check ParameterServerStrategy on one GPU: workers train on CUDA (NCCL between workers), servers in host memory.

Run it on a machine with a GPU (it needs no network and writes nothing outside ``--workdir``)::

    python benchmarks/parameter_server_gpu.py --out benchmarks/results/parameter_server_gpu.json

``--accelerator cpu`` runs the same checks on CPU with gloo, to try the script on a machine without a GPU.
Each check is recorded with its figures and ``ok``; the script exits 1 if any check fails.

1. ``equivalence``: one GPU worker × 1 and × 2 servers, both update placements, sync, over shared memory (pinned
   with CUDA) and over TCP, SGD with momentum and two param groups, and Adam with a StepLR stepped every step,
   against plain single-process training on the device.
2. ``dropin``: an unchanged ``MLPClassifier`` with validation, ``sync_dist`` logging (an NCCL all-reduce), gradient
   accumulation and clipping; bytes per step against the theory; the checkpoint loads into a plain single-device
   Trainer and resumes under the strategy with another number of servers.
3. ``async``: ``mode="async", max_staleness=None`` trains and reports its staleness.
4. ``kill``: the server is killed mid-training; the worker stops with ``PeerLostError`` naming its rank.
5. ``two_nodes``: two torchrun agents as two nodes on this machine, one worker each on the one GPU, × 2 servers,
   sync, against single-process training. Workers talk over gloo here: NCCL refuses two ranks on one GPU.
6. ``sync_batchnorm``: ``Trainer(sync_batchnorm=True)`` (SyncBatchNorm runs on GPUs only) on two torchrun nodes
   sharing the GPU, gloo: both placements against DDP, parameters and BatchNorm buffers of both ranks.
7. ``recipe``: ``lightning-patterns fit --recipe fashion_mnist_parameter_server`` on the GPU (streaming over HTTP from
   127.0.0.1, disk cache) beside ``--recipe fashion_mnist`` on the GPU: validation accuracy after 2 epochs.
8. ``throughput``: steps/s of a ~1M and a ~25M parameter MLP, single device without the strategy beside the
   parameter server (S = 1, 2 sync with each placement over shared memory, S = 1 sync over TCP; S = 2 async),
   batch 256, each with the planner's predicted step time (the model profiled on the GPU) and the exposed and
   overlapped communication; then issue 13's goal: the 24.2M MLP with 1 worker and 1–2 servers at ≥ 30 steps/s.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from parameter_server import SIZES, BenchMLP, StepTimer  # the CPU benchmark's, from this folder
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_patterns.data.in_memory import InMemoryDataModule
from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.models import MLPClassifier
from lightning_patterns.strategies import ParameterServerStrategy
from lightning_patterns.strategies.parameter_server import launcher
from lightning_patterns.testing.launch import free_port, launch_env, run_nodes
from lightning_patterns.testing.tiny_job import TinyJob, TinyRegressor, single_process_reference

SCRIPT = Path(__file__).resolve()


def _trainer(accelerator: str, strategy: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(strategy=strategy, **{**defaults, **kwargs})


def _max_diff(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((actual[k].float().cpu() - expected[k].float().cpu()).abs().max()) for k in expected)


class _Capture(pl.Callback):
    """After the last step: the model, the optimizer state gathered from the servers, the worker's own state."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != trainer.max_steps:
            return
        self.result = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "optimizer_state": trainer.strategy.optimizer_state(trainer.optimizers[0]),
            "worker_state_len": len(trainer.optimizers[0].state),
            "telemetry": trainer.strategy.telemetry,  # type: ignore[attr-defined]
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "device": str(pl_module.device),
        }


def check_equivalence(accelerator: str) -> list[dict[str, Any]]:
    job = TinyJob(steps=6, batch=8, workers=1)
    device = "cuda" if accelerator == "gpu" else "cpu"
    rows = []
    for optimizer, servers, update_on, transport in itertools.product(
        ("sgd", "adam"), (1, 2), ("server", "worker"), ("shm", "tcp")
    ):
        capture = _Capture()
        strategy = ParameterServerStrategy(num_servers=servers, update_on=update_on, timeout=60.0, transport=transport)
        _trainer(accelerator, strategy, max_steps=job.steps, callbacks=[capture]).fit(TinyRegressor(optimizer, job))
        expected_model, expected_optimizer = single_process_reference(optimizer, job, device)
        model_diff = _max_diff(capture.result["state_dict"], expected_model)
        state_diff = max(
            _max_diff(capture.result["optimizer_state"]["state"][i], state)
            for i, state in expected_optimizer["state"].items()
        )
        rows.append(
            {
                "check": f"equivalence {optimizer} S={servers} update_on={update_on} transport={transport}",
                "transports": capture.result["telemetry"].transports,
                "backend": capture.result["backend"],
                "device": capture.result["device"],
                "max_param_diff": model_diff,
                "max_optimizer_state_diff": state_diff,
                "worker_state_len": capture.result["worker_state_len"],
                "ok": model_diff < 1e-5
                and state_diff < 1e-5
                and capture.result["telemetry"].transports == [transport] * servers
                and (update_on == "worker" or capture.result["worker_state_len"] == 0),
            }
        )
    return rows


def _fit_mlp(accelerator: str, workdir: Path, servers: int, max_epochs: int, resume: Path | None) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    trainer = _trainer(
        accelerator,
        ParameterServerStrategy(num_servers=servers, update_on="server", timeout=60.0),
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=workdir / "dropin_ckpt", save_last=True)],
    )
    model = MLPClassifier(hidden_dim=64, num_layers=1, lr=0.01, optimizer="sgd", momentum=0.9)
    data = InMemoryDataModule(train_samples=2048, val_samples=512, batch_size=64, seed=0)
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    return trainer


def check_dropin(accelerator: str, workdir: Path) -> list[dict[str, Any]]:
    first = _fit_mlp(accelerator, workdir, servers=2, max_epochs=1, resume=None)
    telemetry = first.strategy.telemetry  # type: ignore[attr-defined]
    params = sum(p.numel() for p in first.lightning_module.parameters())
    theory = 2 * 4 * params  # one push of float32 gradients, one pull of float32 parameters
    per_step = telemetry.bytes_pushed + telemetry.bytes_pulled
    checkpoint = workdir / "dropin_ckpt" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
    rows = [
        {
            "check": "dropin S=2 (accumulate 2, clip 0.5, validation, sync_dist)",
            "global_step": first.global_step,
            "val_acc": float(first.callback_metrics["val_acc"]),
            "bytes_per_step": per_step,
            "theory_bytes_per_step": theory,
            "bytes_vs_theory": per_step / theory - 1,
            "checkpoint_optimizer_states": len(saved["optimizer_states"][0]["state"]),
            "ok": first.global_step == 16
            and abs(per_step / theory - 1) < 0.05
            and len(saved["optimizer_states"][0]["state"]) == len(saved["state_dict"]),
        }
    ]
    # The checkpoint loads into a plain single-device Trainer, whose optimizer takes over the servers' state.
    # It accumulates nothing: epoch 2 takes all 32 batches as steps.
    plain = _trainer(accelerator, "auto", max_epochs=2, limit_val_batches=1)
    plain.fit(
        MLPClassifier(hidden_dim=64, num_layers=1, lr=0.01, optimizer="sgd", momentum=0.9),
        datamodule=InMemoryDataModule(train_samples=2048, val_samples=512, batch_size=64, seed=0),
        ckpt_path=checkpoint,
    )
    plain_state = len(plain.optimizers[0].state)
    rows.append(
        {
            "check": "checkpoint into a plain single-device Trainer",
            "global_step": plain.global_step,
            "optimizer_states": plain_state,
            "ok": plain.global_step == 16 + 32 and plain_state == len(saved["state_dict"]),
        }
    )
    resumed = _fit_mlp(accelerator, workdir, servers=1, max_epochs=2, resume=checkpoint)
    rows.append(
        {
            "check": "resume under the strategy with 1 server (saved with 2)",
            "global_step": resumed.global_step,
            "val_acc": float(resumed.callback_metrics["val_acc"]),
            "ok": resumed.global_step == 32,
        }
    )
    return rows


def check_async(accelerator: str) -> list[dict[str, Any]]:
    capture = _Capture()
    strategy = ParameterServerStrategy(
        num_servers=2, update_on="server", mode="async", max_staleness=None, timeout=60.0
    )
    job = TinyJob(steps=6, batch=8, workers=1)
    _trainer(accelerator, strategy, max_steps=job.steps, callbacks=[capture]).fit(TinyRegressor("adam", job))
    telemetry = capture.result["telemetry"]
    return [
        {
            "check": "async max_staleness=None S=2",
            "steps": telemetry.steps,
            "max_staleness_seen": telemetry.max_staleness_seen,
            "ok": telemetry.steps == job.steps and capture.result["worker_state_len"] == 0,
        }
    ]


class _KillServer(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 3:
            server = launcher.current_session().processes[0]  # type: ignore[union-attr]
            print(f"KILLED {time.time()}", flush=True)
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def run_kill(accelerator: str) -> None:
    strategy = ParameterServerStrategy(num_servers=1, timeout=20.0)
    trainer = _trainer(accelerator, strategy, max_steps=10_000, callbacks=[_KillServer()])
    try:
        trainer.fit(TinyRegressor("sgd", TinyJob(steps=4, batch=8, workers=1)))
    except PeerLostError as error:
        print(f"STOPPED {time.time()} {error}", flush=True)
        raise


def check_kill(accelerator: str, workdir: Path) -> list[dict[str, Any]]:
    proc = _run_self("kill", accelerator, workdir, timeout=120)
    stopped = proc.stdout.split("STOPPED ")
    seconds = float(stopped[1].split()[0]) - float(proc.stdout.split("KILLED ")[1].split()[0]) if stopped[1:] else None
    return [
        {
            "check": "kill the server: the worker stops with PeerLostError naming rank 1",
            "returncode": proc.returncode,
            "seconds_to_stop": seconds,
            "message": stopped[1].split(" ", 1)[1].strip()[:300] if stopped[1:] else proc.stdout[-2000:],
            "ok": proc.returncode != 0 and seconds is not None and seconds < 20 and "rank 1" in stopped[1],
        }
    ]


def run_two_nodes(accelerator: str, out: Path) -> None:
    capture = _Capture()
    job = TinyJob(steps=6, batch=8, workers=2)
    backend = "gloo"  # two ranks on one GPU: NCCL refuses to share a device between ranks of one group
    strategy = ParameterServerStrategy(num_servers=2, timeout=60.0, process_group_backend=backend)
    trainer = _trainer(accelerator, strategy, num_nodes=2, max_steps=job.steps, callbacks=[capture])
    trainer.fit(TinyRegressor("sgd", job))
    if trainer.global_rank == 0:
        torch.save(capture.result, out)


def check_two_nodes(accelerator: str, workdir: Path) -> list[dict[str, Any]]:
    out = workdir / "two_nodes.pt"
    script = [str(SCRIPT), "--scenario", "two_nodes", "--accelerator", accelerator, "--workdir", str(workdir)]
    nodes = run_nodes(script, nnodes=2, timeout=240)
    if any(code != 0 for code, _ in nodes) or not out.exists():
        return [{"check": "two nodes", "ok": False, "log": "\n".join(log[-3000:] for _, log in nodes)}]
    result = torch.load(out, weights_only=False)
    expected_model, _ = single_process_reference("sgd", TinyJob(steps=6, batch=8, workers=2))
    diff = _max_diff(result["state_dict"], expected_model)
    return [
        {
            "check": "two torchrun nodes × 1 worker on the GPU, 2 servers, sync",
            "device": result["device"],
            "backend": result["backend"],
            "max_param_diff": diff,
            "ok": diff < 1e-5,
        }
    ]


class _BatchNormNet(pl.LightningModule):
    """Linear → BatchNorm → Tanh → Linear on the tiny job's data, SGD with momentum."""

    def __init__(self, job: TinyJob) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        )
        self.job = job
        self.synchronized = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.synchronized = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.modules())
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader[Any]:
        data = self.job.data()
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.job.batch, sampler=sampler)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def run_sync_batchnorm(accelerator: str, workdir: Path) -> None:
    """Each node: DDP, then the parameter server with each placement, all with `sync_batchnorm=True` (gloo)."""
    job = TinyJob(steps=6, batch=8, workers=2)
    strategies = {
        "ddp": pl.strategies.DDPStrategy(process_group_backend="gloo"),
        "worker": ParameterServerStrategy(num_servers=2, update_on="worker", process_group_backend="gloo"),
        "server": ParameterServerStrategy(num_servers=2, update_on="server", process_group_backend="gloo"),
    }
    for label, strategy in strategies.items():
        model = _BatchNormNet(job)
        trainer = _trainer(accelerator, strategy, num_nodes=2, max_steps=job.steps, sync_batchnorm=True)
        trainer.fit(model)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        record = {"state_dict": state, "synchronized": model.synchronized, "device": str(model.device)}
        torch.save(record, workdir / f"sync_batchnorm_{label}_rank{trainer.global_rank}.pt")


def check_sync_batchnorm(accelerator: str, workdir: Path) -> list[dict[str, Any]]:
    script = [str(SCRIPT), "--scenario", "sync_batchnorm", "--accelerator", accelerator, "--workdir", str(workdir)]
    nodes = run_nodes(script, nnodes=2, timeout=300)
    if any(code != 0 for code, _ in nodes):
        return [{"check": "sync_batchnorm", "ok": False, "log": "\n".join(log[-3000:] for _, log in nodes)}]
    rows = []
    for label in ("worker", "server"):
        diffs, synchronized = [], []
        for rank in range(2):
            actual = torch.load(workdir / f"sync_batchnorm_{label}_rank{rank}.pt", weights_only=False)
            expected = torch.load(workdir / f"sync_batchnorm_ddp_rank{rank}.pt", weights_only=False)
            diffs.append(_max_diff(actual["state_dict"], expected["state_dict"]))
            synchronized.append(actual["synchronized"] and expected["synchronized"])
        rows.append(
            {
                "check": f"sync_batchnorm=True, 2 torchrun nodes on the GPU, update_on={label} against DDP",
                "max_diff_params_and_buffers": max(diffs),
                "sync_batchnorm_layers": all(synchronized),
                "ok": max(diffs) < 1e-5 and all(synchronized),
            }
        )
    return rows


def _val_acc(metrics_csv: Path) -> float:
    with metrics_csv.open() as handle:
        values = [row["val_acc"] for row in csv.DictReader(handle) if row.get("val_acc")]
    return float(values[-1])


def check_recipe(accelerator: str, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    accuracies = {}
    for recipe in ("fashion_mnist", "fashion_mnist_parameter_server"):
        logs = workdir / recipe
        command = [
            sys.executable,
            "-m",
            "lightning_patterns",
            "fit",
            "--recipe",
            recipe,
            f"--trainer.accelerator={accelerator}",
            "--trainer.devices=1",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={logs}",
            f"--trainer.logger.init_args.save_dir={logs}",
        ]
        if recipe.endswith("parameter_server"):
            # One worker carries the global batch the recipe splits over two.
            command += ["--data.init_args.batch_size=256", f"--data.init_args.cache_dir={logs}/cache"]
        started = time.perf_counter()
        # A port of its own: this process's earlier fits still hold theirs.
        env = launch_env(free_port())
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=workdir, check=False)
        seconds = time.perf_counter() - started
        metrics = sorted(logs.rglob("metrics.csv"))
        if proc.returncode != 0 or not metrics:
            rows.append({"check": f"recipe {recipe}", "ok": False, "log": proc.stdout[-1500:] + proc.stderr[-3000:]})
            continue
        accuracies[recipe] = _val_acc(metrics[-1])
        rows.append({"check": f"recipe {recipe}", "val_acc": accuracies[recipe], "seconds": seconds, "ok": True})
    if len(accuracies) == 2:
        gap = accuracies["fashion_mnist"] - accuracies["fashion_mnist_parameter_server"]
        rows.append({"check": "parameter server within 1 point of single device", "gap": gap, "ok": gap <= 0.01})
    return rows


def _throughput_plan(accelerator: str, widths: list[int], steps: int) -> Any:
    """The planner's predictions for one worker on this device (the model profiled here, the links measured)."""
    from lightning_patterns.strategies.parameter_server.planner import (
        count_buckets,
        local_cluster,
        measure_links,
        plan,
        profile_module,
    )

    torch.manual_seed(0)
    n = (steps + 3) * 256
    data = TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    cores = os.cpu_count() or 1
    workload, numels, itemsizes = profile_module(
        BenchMLP(widths),
        lambda **kwargs: _trainer(accelerator, "auto", **kwargs),
        lambda trainer, module: trainer.fit(module, DataLoader(data, batch_size=256)),
        pl.Callback,
        steps=10,
        server_threads=max(1, cores // 2),
    )
    links = measure_links(int(workload.model_bytes), threads=max(1, cores // 2))
    cluster = local_cluster(1, links, workers_on_cpu=accelerator == "cpu", cores=cores)
    return plan(workload, cluster, 2, lambda servers: count_buckets(numels, itemsizes, servers))


def check_throughput(accelerator: str, steps: int) -> list[dict[str, Any]]:
    import dataclasses

    from lightning_patterns.strategies.parameter_server.cost_model import predict_parameter_server
    from lightning_patterns.strategies.parameter_server.planner import format_plan

    rows = []
    for size, widths in SIZES.items():
        params = sum(a * b + b for a, b in itertools.pairwise(widths))
        predictions = _throughput_plan(accelerator, widths, steps)
        configs: list[tuple[str, Any]] = [("single device, no strategy", "auto")]
        configs += [
            (f"PS S={s} {mode} update_on={update_on} transport={transport}", (s, mode, update_on, transport))
            for s, mode, update_on, transport in (
                (1, "sync", "worker", "auto"),
                (2, "sync", "worker", "auto"),
                (1, "sync", "server", "auto"),
                (2, "sync", "server", "auto"),
                (1, "sync", "worker", "tcp"),
                (1, "sync", "server", "tcp"),
                (2, "async", "server", "auto"),  # async: one worker, so only overlap changes
            )
        ]
        for label, config in configs:
            torch.manual_seed(0)
            n = (steps + 3) * 256
            data = TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
            strategy = config
            predicted = None
            if isinstance(config, tuple):
                servers, mode, update_on, transport = config
                staleness = 0 if mode == "sync" else None
                strategy = ParameterServerStrategy(
                    num_servers=servers, update_on=update_on, mode=mode, max_staleness=staleness, transport=transport
                )
                row_plan = next(r for r in predictions.rows if (r.servers, r.update_on) == (servers, update_on))
                if mode == "sync":
                    cluster = dataclasses.replace(predictions.cluster, shared_memory=transport != "tcp")
                    predicted = predict_parameter_server(row_plan.workload, cluster, servers, update_on).step_seconds
            timer = StepTimer(warmup=3)
            model = BenchMLP(widths)
            _trainer(accelerator, strategy, max_steps=steps + 3, callbacks=[timer]).fit(
                model, DataLoader(data, batch_size=256)
            )
            speed = timer.steps_per_second()
            row = {
                "check": f"throughput {size} {label}",
                "params": params,
                "steps_per_s": speed,
                "predicted_steps_per_s": 1 / predicted if predicted else None,
                "ok": True,
            }
            if isinstance(strategy, ParameterServerStrategy):
                t = strategy.telemetry
                row["bytes_per_step"] = (t.total_bytes_pushed + t.total_bytes_pulled) / max(t.steps, 1)
                row["comm_fraction"] = t.comm_fraction
                row["comm_overlapped_fraction"] = t.overlapped_fraction
                row["transports"] = t.transports
            rows.append(row)
        print(format_plan(predictions), flush=True)
    best = max(
        (r for r in rows if r["check"].startswith("throughput 25m PS") and " sync " in r["check"]),
        key=lambda r: r["steps_per_s"] or 0.0,
    )
    rows.append(
        {
            "check": "goal: 24.2M MLP, 1 GPU worker, 1–2 servers, sync: ≥ 30 steps/s",
            "best": best["check"],
            "steps_per_s": best["steps_per_s"],
            "ok": accelerator != "gpu" or (best["steps_per_s"] or 0.0) >= 30.0,
        }
    )
    return rows


def _run_self(scenario: str, accelerator: str, workdir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--scenario", scenario, "--accelerator", accelerator]
    return subprocess.run(
        [*command, "--workdir", str(workdir)],
        env=launch_env(free_port()),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _environment(accelerator: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "pytorch_lightning": pl.__version__}
    if accelerator == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    info["cpu_count"] = os.cpu_count()
    return info


def _figures(row: dict[str, Any]) -> str:
    skip = {"check", "ok", "log", "seconds_for_check", "message", "error"}
    return ", ".join(
        f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in row.items()
        if key not in skip
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The checks as a Markdown table (for ``benchmarks/results/REPORT.md``)."""
    lines = ["| check | figures | ok |", "|---|---|---|"]
    lines += [f"| {row['check']} | {_figures(row)} | {'yes' if row['ok'] else '**no**'} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", default="equivalence,dropin,async,kill,two_nodes,sync_batchnorm,recipe,throughput")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per throughput row")
    parser.add_argument("--workdir", default="/tmp/parameter_server_gpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # the child processes of multi-process checks
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.scenario == "kill":
        run_kill(args.accelerator)
        return
    if args.scenario == "two_nodes":
        run_two_nodes(args.accelerator, workdir / "two_nodes.pt")
        return
    if args.scenario == "sync_batchnorm":
        run_sync_batchnorm(args.accelerator, workdir)
        return
    os.environ.update({k: v for k, v in launch_env(free_port()).items() if k.startswith("MASTER_")})
    checks = {
        "equivalence": lambda: check_equivalence(args.accelerator),
        "dropin": lambda: check_dropin(args.accelerator, workdir),
        "async": lambda: check_async(args.accelerator),
        "kill": lambda: check_kill(args.accelerator, workdir),
        "two_nodes": lambda: check_two_nodes(args.accelerator, workdir),
        "sync_batchnorm": lambda: check_sync_batchnorm(args.accelerator, workdir),
        "recipe": lambda: check_recipe(args.accelerator, workdir),
        "throughput": lambda: check_throughput(args.accelerator, args.steps),
    }
    results: dict[str, Any] = {
        "benchmark": "parameter_server_gpu",
        "title": "Parameter server on a GPU",
        "environment": _environment(args.accelerator),
        "rows": [],
    }
    for name in args.checks.split(","):
        started = time.perf_counter()
        try:
            rows = checks[name]()
        except Exception as error:  # record the failure and go on with the other checks
            rows = [{"check": name, "ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}]
        for row in rows:
            row["seconds_for_check"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row, default=str), flush=True)
        results["rows"] += rows
        results["markdown"] = markdown_table(results["rows"])
        if args.out:  # after every check, so a run stopped early still leaves what it measured
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    failed = [row["check"] for row in results["rows"] if not row["ok"]]
    print(f"{len(results['rows']) - len(failed)} checks passed; failed: {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
