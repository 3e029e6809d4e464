"""Benchmark: ParameterServerStrategy (S = 1, 2; both update placements; sync and async) beside DDP, on CPU.

Prints a Markdown table of steps per second and bytes per step per worker for an MLP of about 1M and one
of about 25M parameters, with the planner's predicted step time beside each measured one, and the planner's
table and recommendation. Run it as a script (Lightning's launcher re-runs it for the second worker):

    python benchmarks/parameter_server.py                  # the full table (about 3 minutes on 2 cores)
    python benchmarks/parameter_server.py --quick          # smoke check: the 1M model, 5 timed steps
    python benchmarks/parameter_server.py --out PATH       # also write a JSON result (what `make bench` does)

Every parameter-server configuration uses the default transport (``"auto"``: shared memory, since workers and
servers share this host); S = 1 in sync mode also runs over ``"tcp"`` (gloo), the transport between hosts.
Before any run, worker rank 0 profiles each model on one process (the planner's ``profile_module``) and this
machine's copies, sums and TCP (``measure_links``), and predicts every sync row (``predicted_step_s``; async
rows have none: the cost model is of synchronous steps).

Bytes are sent plus received per worker per step. For the parameter server they are measured (every byte of
the protocol, headers included, through shared memory or TCP); for DDP they are the ring all-reduce's theory,
2 × 2 (W - 1) / W × gradient bytes, since DDP does not count them. ``comm_fraction`` is the share of the step
spent in communication that nothing hides (exposed), ``comm_overlapped_fraction`` the share of all
communication time that overlapped computation.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.strategies import ParameterServerStrategy
from lightning_patterns.strategies.parameter_server.cost_model import predict_parameter_server
from lightning_patterns.strategies.parameter_server.planner import (
    Plan,
    count_buckets,
    format_plan,
    local_cluster,
    measure_links,
    plan,
    profile_module,
)

# data_loading imports only the standard library at module level, so this needs no peer library.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loading import machine_info

SIZES = {
    "1m": [784, 1024, 256, 10],  # 1.07M parameters
    "25m": [784, 4096, 4096, 1024, 10],  # 24.2M parameters
}
# Timed steps per size: about one second of timing for the 1M model (it makes ~40-60 steps/s here, so
# fewer steps would time mostly noise) and 3-12 s for the 25M one (1.5-3 steps/s, under 1 under load).
# The whole table then takes about 110 s on 2 cores, most of it starting worker and server processes.
STEPS = {"1m": 50, "25m": 10}
QUICK_STEPS = 5
WARMUP_STEPS = 2
TITLE = "Parameter server vs DDP"


class BenchMLP(pl.LightningModule):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    """Wall time of the steps after ``warmup``, and this process's CPU time over them (what load cannot inflate)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.warmup:
            if torch.cuda.is_available():  # the GPU check reuses this timer: wait for the step's kernels
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def steps_per_second(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def cpu_per_step(self) -> float | None:
        """This process's CPU seconds per step (all its threads: gloo's included)."""
        if len(self.cpu) < 2:
            return None
        return (self.cpu[-1] - self.cpu[0]) / (len(self.cpu) - 1)


def num_parameters(size: str) -> int:
    """Parameters of the MLP of ``size`` (weights and biases)."""
    return sum(a * b + b for a, b in itertools.pairwise(SIZES[size]))


def strategies(servers: list[int], modes: list[str], placements: list[str], tcp: bool) -> list[dict[str, Any]]:
    """The configurations: DDP first, then one parameter server per (servers, mode, placement, transport).

    Asynchronous modes exist only with the optimizer on the servers (``update_on="server"``); ``tcp`` adds S = 1
    in sync mode over TCP. Each is a dict of ``label``, ``servers`` (0 for DDP), ``mode``, ``update_on``,
    ``transport`` and a ``make()`` building the strategy.
    """
    configs: list[dict[str, Any]] = [
        {"label": "DDP", "servers": 0, "mode": "sync", "update_on": "", "transport": "tcp", "make": lambda: "ddp"}
    ]
    transports = ["auto", "tcp"] if tcp else ["auto"]
    for num_servers, mode, update_on, transport in itertools.product(servers, modes, placements, transports):
        if mode == "async" and update_on == "worker":
            continue
        if transport == "tcp" and (num_servers != 1 or mode != "sync"):
            continue
        staleness = 0 if mode == "sync" else None
        suffix = " tcp" if transport == "tcp" else ""
        configs.append(
            {
                "label": f"PS S={num_servers} {mode} update_on={update_on}{suffix}",
                "servers": num_servers,
                "mode": mode,
                "update_on": update_on,
                "transport": transport,
                "make": lambda s=num_servers, m=mode, u=update_on, t=transport, z=staleness: ParameterServerStrategy(
                    num_servers=s, update_on=u, mode=m, max_staleness=z, transport=t
                ),
            }
        )
    return configs


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def _data(size: str, steps: int, batch_size: int, workers: int) -> TensorDataset:
    n = (steps + WARMUP_STEPS) * batch_size * workers
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 784, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def predict(size: str, args: argparse.Namespace) -> Plan:
    """Profile the model of ``size`` on one process and this machine's links; predict DDP and each S, placement.

    The workers compute on one thread each, as in the runs; a server uses ``cores // (workers + 1)`` threads, as
    the servers do.
    """
    torch.manual_seed(0)
    model = BenchMLP(SIZES[size])
    data = _data(size, 10, args.batch_size, 1)
    workload, numels, itemsizes = profile_module(
        model,
        lambda **kwargs: _trainer(devices=1, **kwargs),
        lambda trainer, module: trainer.fit(module, DataLoader(data, batch_size=args.batch_size)),
        pl.Callback,
        steps=5,
        server_threads=max(1, (os.cpu_count() or 1) // (args.workers + 1)),
    )
    links = measure_links(int(workload.model_bytes), threads=1)
    cluster = local_cluster(args.workers, links, workers_on_cpu=True)
    return plan(workload, cluster, max(args.servers), lambda servers: count_buckets(numels, itemsizes, servers))


def predicted_step(config: dict[str, Any], predictions: Plan) -> float | None:
    """The predicted step time of a sync configuration (DDP, or PS over either transport); ``None`` for async."""
    if config["mode"] != "sync":
        return None
    if config["servers"] == 0:
        return predictions.ddp.prediction.step_seconds
    row = next(r for r in predictions.rows if (r.servers, r.update_on) == (config["servers"], config["update_on"]))
    if config["transport"] == "tcp":
        cluster = dataclasses.replace(predictions.cluster, shared_memory=False)
        return predict_parameter_server(row.workload, cluster, config["servers"], config["update_on"]).step_seconds
    return row.prediction.step_seconds


def run(size: str, strategy: Any, steps: int, batch_size: int, workers: int) -> dict[str, Any]:
    """Train ``steps`` timed steps (after warm-up); return steps/s, bytes per step per worker, comm fractions."""
    torch.manual_seed(0)
    model = BenchMLP(SIZES[size])
    timer = StepTimer(warmup=WARMUP_STEPS)
    trainer = _trainer(strategy=strategy, devices=workers, max_steps=steps + WARMUP_STEPS, callbacks=[timer])
    trainer.fit(model, DataLoader(_data(size, steps, batch_size, workers), batch_size=batch_size))
    telemetry = strategy.telemetry if isinstance(strategy, ParameterServerStrategy) else None
    overlapped: float | None = None
    if telemetry is not None:
        per_step = (telemetry.total_bytes_pushed + telemetry.total_bytes_pulled) / max(telemetry.steps, 1)
        comm: float | None = telemetry.comm_fraction
        overlapped = telemetry.overlapped_fraction
    else:
        # Ring all-reduce: each worker sends and receives 2 (W - 1) / W of the gradient bytes.
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_step, comm = 2 * 2 * (workers - 1) / workers * grad_bytes, None
    speed = timer.steps_per_second()
    return {
        "steps_per_s": speed,
        "step_s": 1.0 / speed if speed else None,
        "worker_cpu_s_per_step": timer.cpu_per_step(),
        "bytes_per_step": per_step,
        "bytes_measured": telemetry is not None,
        "comm_fraction": comm,
        "comm_overlapped_fraction": overlapped,
        "transports": telemetry.transports if telemetry is not None else None,
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table this script prints, with a line on the setup above it."""
    steps = ", ".join(f"{size}: {args.steps_by_size[size]}" for size in args.sizes)
    lines = [
        f"Workers: {args.workers} (CPU, gloo), batch {args.batch_size} per worker, SGD with momentum, "
        f"timed steps after {WARMUP_STEPS} warm-up steps ({steps}); load average {args.load[0]} before, "
        f"{args.load[1]} after.",
        "",
        "| model | strategy | steps/s | vs DDP | step ms | predicted ms | MB per step per worker | exposed comm "
        "| overlapped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ddp = {row["size"]: row["steps_per_s"] for row in rows if row["strategy"] == "DDP"}
    for row in rows:
        speed = row["steps_per_s"]
        ratio = speed / ddp[row["size"]] if speed and ddp.get(row["size"]) else None
        step = row["step_s"] * 1e3 if row["step_s"] else None
        predicted = row["predicted_step_s"] * 1e3 if row["predicted_step_s"] else None
        lines.append(
            f"| {row['model']} | {row['strategy']} | {_fmt(speed, '.2f')} | {_fmt(ratio, '.2f')} | {_fmt(step, '.1f')} "
            f"| {_fmt(predicted, '.1f')} | {row['bytes_per_step'] / 1e6:.2f} | {_fmt(row['comm_fraction'], '.2f')} "
            f"| {_fmt(row['comm_overlapped_fraction'], '.2f')} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], plans: dict[str, Plan]) -> dict[str, Any]:
    """Issue 13's goals, per model: best sync PS against DDP, its exposed communication, prediction errors."""
    out: dict[str, Any] = {}
    for size, predictions in plans.items():
        mine = [r for r in rows if r["size"] == size]
        ddp = next(r for r in mine if r["strategy"] == "DDP")
        sync = [
            r for r in mine if r["mode"] == "sync" and r["servers"] and r["transport"] == "auto" and r["steps_per_s"]
        ]
        if not sync or not ddp["steps_per_s"]:
            continue
        best = max(sync, key=lambda r: r["steps_per_s"])
        recommended = predictions.best
        chosen = next(
            (r for r in sync if (r["servers"], r["update_on"]) == (recommended.servers, recommended.update_on)), None
        )
        errors = {
            r["strategy"]: r["step_s"] / r["predicted_step_s"] - 1
            for r in mine
            if r.get("predicted_step_s") and r["step_s"]
        }
        out[size] = {
            "best": best["strategy"],
            "best_vs_ddp": best["steps_per_s"] / ddp["steps_per_s"],
            "best_exposed_comm": best["comm_fraction"],
            "recommended": recommended.label,
            "recommended_vs_measured_best": chosen["steps_per_s"] / best["steps_per_s"] if chosen else None,
            "ddp_predicted_faster": predictions.ddp_faster,
            "prediction_errors": errors,
            "max_abs_prediction_error": max((abs(e) for e in errors.values()), default=None),
        }
    return out


def write_result(
    path: Path, rows: list[dict[str, Any]], plans: dict[str, Plan], args: argparse.Namespace, started: float
) -> None:
    """Write the JSON result that ``report.py`` reads (its ``markdown`` key is the printed table)."""
    doc = {
        "benchmark": "parameter_server",
        "title": TITLE,
        "params": {
            "sizes": {size: num_parameters(size) for size in args.sizes},
            "servers": args.servers,
            "modes": args.modes,
            "placements": args.placements,
            "steps": args.steps_by_size,
            "warmup_steps": WARMUP_STEPS,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "quick": args.quick,
        },
        "machine": machine_info(),
        "load_average": {"before": args.load[0], "after": args.load[1]},
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "rows": rows,
        "plans": {size: format_plan(p) for size, p in plans.items()},
        "goals": goals(rows, plans),
        "markdown": markdown_table(rows, args)
        + "".join(
            f"\n\nPlanner, {num_parameters(size) / 1e6:.1f}M model (profiled before the runs):\n\n{format_plan(p)}"
            for size, p in plans.items()
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def load_average() -> str:
    """The 1-minute load average (the machine is shared: read every figure beside it)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``steps_by_size`` is filled in from ``--steps``, ``--quick`` or ``STEPS``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated model sizes (default 1m,25m; --quick: 1m)")
    parser.add_argument("--servers", default="1,2", help="comma-separated server counts")
    parser.add_argument("--modes", default="sync,async", help="comma-separated modes")
    parser.add_argument("--placements", default="worker,server", help="comma-separated update placements")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps for every size (default {STEPS})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=f"smoke check: the 1M model, {QUICK_STEPS} timed steps")
    parser.add_argument("--no-tcp", dest="tcp", action="store_false", help="skip the S = 1 sync rows over TCP")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    args.sizes = (args.sizes or ("1m" if args.quick else "1m,25m")).split(",")
    args.servers = [int(s) for s in args.servers.split(",")]
    args.modes = args.modes.split(",")
    args.placements = args.placements.split(",")
    unknown = sorted(set(args.sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    default_steps = QUICK_STEPS if args.quick else None
    args.steps_by_size = {size: args.steps or default_steps or STEPS[size] for size in args.sizes}
    return args


def is_rank_zero() -> bool:
    """Lightning's launcher runs this whole script again as worker rank 1: only rank 0 reports."""
    return bool(pl.utilities.rank_zero_only.rank == 0)  # type: ignore[attr-defined]


def quiet_lightning() -> None:
    """Keep ``make bench``'s log readable: Lightning prints its banner and tips again at every fit, on each rank."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*deprecated")


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    quiet_lightning()
    args = parse_args(argv)
    started = time.time()
    args.load = [load_average(), None]
    # Worker rank 0 profiles every model before the first run starts the other worker (which skips this).
    plans = {size: predict(size, args) for size in args.sizes} if os.environ.get("LOCAL_RANK", "0") == "0" else {}
    rows = []
    for size in args.sizes:
        for config in strategies(args.servers, args.modes, args.placements, args.tcp):
            t0 = time.perf_counter()
            result = run(size, config["make"](), args.steps_by_size[size], args.batch_size, args.workers)
            row = {
                "model": f"{num_parameters(size) / 1e6:.1f}M",
                "size": size,
                "strategy": config["label"],
                **{key: config[key] for key in ("servers", "mode", "update_on", "transport")},
                **result,
                "predicted_step_s": predicted_step(config, plans[size]) if plans else None,
            }
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if is_rank_zero():
                speed = row["steps_per_s"] or float("nan")
                predicted = row["predicted_step_s"]
                guess = f", predicted {1 / predicted:.2f}" if predicted else ""
                print(
                    f"[ps] {row['model']} {config['label']}: {speed:.2f} steps/s{guess}  [{row['seconds']:.0f} s, "
                    f"load {load_average()}]",
                    flush=True,
                )
    if not is_rank_zero():
        return
    args.load[1] = load_average()
    sys.stdout.write(markdown_table(rows, args) + "\n")
    for size, predictions in plans.items():
        sys.stdout.write(f"\nPlanner, {num_parameters(size) / 1e6:.1f}M:\n{format_plan(predictions)}\n")
    sys.stdout.write(json.dumps(goals(rows, plans), indent=1) + "\n")
    if args.out:
        write_result(Path(args.out), rows, plans, args, started)
        sys.stdout.write(f"wrote {args.out} in {time.time() - started:.0f} s\n")


if __name__ == "__main__":
    main()
