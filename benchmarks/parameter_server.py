"""Benchmark: ParameterServerStrategy (S = 1, 2; sync and async) beside Lightning's DDP, same workers, on CPU.

Prints a Markdown table of steps per second and bytes per step per worker for an MLP of about 1M and one
of about 25M parameters. Run it as a script (Lightning's launcher re-runs it for the second worker):

    python benchmarks/parameter_server.py                   # the full table (minutes on 2 cores)
    python benchmarks/parameter_server.py --sizes 1m --steps 10   # a quick check

Bytes are sent plus received per worker per step. For the parameter server they are measured (every
byte handed to torch.distributed, headers included); for DDP they are the ring all-reduce's theory,
2 × 2 (W - 1) / W × gradient bytes, since DDP does not count them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.strategies import ParameterServerStrategy

SIZES = {
    "1m": [784, 1024, 256, 10],  # 1.07M parameters
    "25m": [784, 4096, 4096, 1024, 10],  # 24.2M parameters
}


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
            self.times.append(time.perf_counter())

    def steps_per_second(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def run(size: str, strategy: Any, steps: int, batch_size: int, workers: int) -> tuple[float, float, float]:
    """Train ``steps`` steps; return (steps/s, bytes per step per worker, communication fraction)."""
    torch.manual_seed(0)
    model = BenchMLP(SIZES[size])
    n = (steps + 2) * batch_size * workers
    data = TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    timer = StepTimer(warmup=2)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=workers,
        max_steps=steps + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, DataLoader(data, batch_size=batch_size))
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    telemetry = strategy.telemetry if isinstance(strategy, ParameterServerStrategy) else None
    if telemetry is not None:
        per_step = (telemetry.total_bytes_pushed + telemetry.total_bytes_pulled) / max(telemetry.steps, 1)
        comm = telemetry.total_comm_seconds / max(telemetry.total_comm_seconds + telemetry.total_compute_seconds, 1e-9)
        return timer.steps_per_second(), per_step, comm
    # Ring all-reduce: each worker sends and receives 2 (W - 1) / W of the gradient bytes.
    return timer.steps_per_second(), 2 * 2 * (workers - 1) / workers * grad_bytes, float("nan")


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1m,25m")
    parser.add_argument("--servers", default="1,2")
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        params = sum(a * b + b for a, b in itertools.pairwise(SIZES[size]))
        configs: list[tuple[str, Any]] = [("DDP", "ddp")]
        for servers in (int(s) for s in args.servers.split(",")):
            for mode in args.modes.split(","):
                staleness = 0 if mode == "sync" else None
                label = f"PS S={servers} {mode}"
                configs.append(
                    (label, ParameterServerStrategy(num_servers=servers, mode=mode, max_staleness=staleness))
                )
        for label, strategy in configs:
            speed, per_step, comm = run(size, strategy, args.steps, args.batch_size, args.workers)
            rows.append((f"{params / 1e6:.1f}M", label, speed, per_step, comm))
    if pl.utilities.rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        out = [
            f"Workers: {args.workers} (CPU, gloo), batch {args.batch_size} per worker, SGD with momentum, "
            f"{args.steps} timed steps.",
            "",
            "| model | strategy | steps/s | MB sent + received per step per worker | comm fraction |",
            "|---|---|---:|---:|---:|",
        ]
        for params_label, label, speed, per_step, comm in rows:
            comm_text = "–" if comm != comm else f"{comm:.2f}"
            out.append(f"| {params_label} | {label} | {speed:.2f} | {per_step / 1e6:.2f} | {comm_text} |")
        sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
