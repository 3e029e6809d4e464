"""Benchmark: ParameterServerStrategy (S = 1, 2; both update placements; sync and async) beside DDP, on CPU.

Prints a Markdown table of steps per second and bytes per step per worker for an MLP of about 1M and one
of about 25M parameters. Run it as a script (Lightning's launcher re-runs it for the second worker):

    python benchmarks/parameter_server.py                  # the full table (about 3 minutes on 2 cores)
    python benchmarks/parameter_server.py --quick          # smoke check: the 1M model, 5 timed steps
    python benchmarks/parameter_server.py --out PATH       # also write a JSON result (what `make bench` does)

Bytes are sent plus received per worker per step. For the parameter server they are measured (every
byte handed to torch.distributed, headers included); for DDP they are the ring all-reduce's theory,
2 × 2 (W - 1) / W × gradient bytes, since DDP does not count them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
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
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.warmup:
            if torch.cuda.is_available():  # the GPU check reuses this timer: wait for the step's kernels
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def steps_per_second(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def num_parameters(size: str) -> int:
    """Parameters of the MLP of ``size`` (weights and biases)."""
    return sum(a * b + b for a, b in itertools.pairwise(SIZES[size]))


def strategies(servers: list[int], modes: list[str], placements: list[str]) -> list[tuple[str, Any]]:
    """(label, strategy) pairs: DDP first, then one parameter server per (servers, mode, placement).

    Asynchronous modes exist only with the optimizer on the servers (``update_on="server"``).
    """
    configs: list[tuple[str, Any]] = [("DDP", "ddp")]
    for num_servers, mode, update_on in itertools.product(servers, modes, placements):
        if mode == "async" and update_on == "worker":
            continue
        staleness = 0 if mode == "sync" else None
        strategy = ParameterServerStrategy(
            num_servers=num_servers, update_on=update_on, mode=mode, max_staleness=staleness
        )
        configs.append((f"PS S={num_servers} {mode} update_on={update_on}", strategy))
    return configs


def run(size: str, strategy: Any, steps: int, batch_size: int, workers: int) -> dict[str, Any]:
    """Train ``steps`` timed steps (after warm-up); return steps/s, bytes per step per worker, comm fraction."""
    torch.manual_seed(0)
    model = BenchMLP(SIZES[size])
    n = (steps + WARMUP_STEPS) * batch_size * workers
    data = TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    timer = StepTimer(warmup=WARMUP_STEPS)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=workers,
        max_steps=steps + WARMUP_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, DataLoader(data, batch_size=batch_size))
    telemetry = strategy.telemetry if isinstance(strategy, ParameterServerStrategy) else None
    if telemetry is not None:
        per_step = (telemetry.total_bytes_pushed + telemetry.total_bytes_pulled) / max(telemetry.steps, 1)
        busy = telemetry.total_comm_seconds + telemetry.total_compute_seconds
        comm: float | None = telemetry.total_comm_seconds / max(busy, 1e-9)
    else:
        # Ring all-reduce: each worker sends and receives 2 (W - 1) / W of the gradient bytes.
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_step, comm = 2 * 2 * (workers - 1) / workers * grad_bytes, None
    return {
        "steps_per_s": timer.steps_per_second(),
        "bytes_per_step": per_step,
        "bytes_measured": telemetry is not None,
        "comm_fraction": comm,
    }


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table this script prints, with a line on the setup above it."""
    steps = ", ".join(f"{size}: {args.steps_by_size[size]}" for size in args.sizes)
    lines = [
        f"Workers: {args.workers} (CPU, gloo), batch {args.batch_size} per worker, SGD with momentum, "
        f"timed steps after {WARMUP_STEPS} warm-up steps ({steps}).",
        "",
        "| model | strategy | steps/s | MB sent + received per step per worker | comm fraction |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        speed = "n/a" if row["steps_per_s"] is None else f"{row['steps_per_s']:.2f}"
        comm = "–" if row["comm_fraction"] is None else f"{row['comm_fraction']:.2f}"
        lines.append(f"| {row['model']} | {row['strategy']} | {speed} | {row['bytes_per_step'] / 1e6:.2f} | {comm} |")
    return "\n".join(lines)


def write_result(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, started: float) -> None:
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
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "rows": rows,
        "markdown": markdown_table(rows, args),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


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
    rows = []
    for size in args.sizes:
        for label, strategy in strategies(args.servers, args.modes, args.placements):
            t0 = time.perf_counter()
            result = run(size, strategy, args.steps_by_size[size], args.batch_size, args.workers)
            row = {"model": f"{num_parameters(size) / 1e6:.1f}M", "size": size, "strategy": label, **result}
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if is_rank_zero():
                speed = row["steps_per_s"] or float("nan")
                print(f"[ps] {row['model']} {label}: {speed:.2f} steps/s  [{row['seconds']:.0f} s]", flush=True)
    if not is_rank_zero():
        return
    sys.stdout.write(markdown_table(rows, args) + "\n")
    if args.out:
        write_result(Path(args.out), rows, args, started)
        sys.stdout.write(f"wrote {args.out} in {time.time() - started:.0f} s\n")


if __name__ == "__main__":
    main()
