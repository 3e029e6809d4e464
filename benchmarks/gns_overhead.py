"""Benchmark: what GradientNoiseScale costs per training step (issue 15's goal: at most 5% of the step time).

The demo model (``MLPClassifier``, 784-128-128-10, Adam) on ``InMemoryDataModule`` data, batch 256, one process,
no validation and no logger. Each configuration runs in a fresh Trainer in this process; runs of the baseline and
of the callback alternate, so load on a shared machine hits both alike, and each figure is the median over the
runs of the mean step time over the timed steps (after warm-up steps). On a busy machine the A/B difference is
noise, so each callback run also times the callback's own work inside the step (its hooks: it adds nothing to the
backward pass) and reports it as a fraction of that run's step time; on a CPU, where the work is synchronous,
that fraction is the overhead. Configurations:

- ``baseline``: no callback;
- ``gns``: ``GradientNoiseScale()``, consecutive steps (one flattened gradient copy and two dot products per step);
- with ``--accumulation 2`` also ``baseline, K=2`` and ``gns, K=2``: micro-batches of 128 (a flattening copy,
  a subtraction and a dot product per micro-batch).

    python benchmarks/gns_overhead.py                       # CPU, 5 × 2 runs of 300 timed steps
    python benchmarks/gns_overhead.py --accelerator gpu     # on a CUDA GPU
    python benchmarks/gns_overhead.py --quick               # smoke check
    python benchmarks/gns_overhead.py --out PATH            # also write a JSON result
    python benchmarks/gns_overhead.py --measure-every 1     # measure every step (default: one in 4)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_patterns.callbacks import GradientNoiseScale
from lightning_patterns.data import InMemoryDataModule
from lightning_patterns.models import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loading import machine_info

GOAL = 0.05


class StepTimer(pl.Callback):
    """Mean seconds per optimizer step over the steps after ``warmup`` (the device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started: float | None = None
        self.seconds_per_step: float | None = None

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = self._now(pl_module)
        elif trainer.global_step == trainer.max_steps and self.started is not None:
            self.seconds_per_step = (self._now(pl_module) - self.started) / (trainer.global_step - self.warmup)


class SelfTime:
    """Seconds spent inside GradientNoiseScale's hooks, after warm-up."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.counting = False

    def wrap(self, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if self.counting:
                    self.seconds += time.perf_counter() - started

        return timed


def timed_callback(clock: SelfTime, warmup: int, measure_every: int) -> pl.Callback:
    callback = GradientNoiseScale(measure_every_n_steps=measure_every)
    for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"):
        setattr(callback, hook, clock.wrap(getattr(callback, hook)))
    original_end = callback.on_train_batch_end

    def on_train_batch_end(trainer: pl.Trainer, *args: Any) -> None:
        original_end(trainer, *args)
        clock.counting = warmup <= trainer.global_step < trainer.max_steps

    callback.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign]
    return callback


def run(args: argparse.Namespace, with_gns: bool, accumulation: int) -> tuple[float, float]:
    """Seconds per optimizer step of one fresh fit, and of those the callback's own seconds."""
    torch.manual_seed(0)
    timer = StepTimer(args.warmup)
    callbacks: list[pl.Callback] = [timer]
    clock = SelfTime()
    if with_gns:
        callbacks.append(timed_callback(clock, args.warmup, args.measure_every))
    micro = args.batch_size // accumulation
    steps = args.warmup + args.steps
    data = InMemoryDataModule(train_samples=steps * args.batch_size, val_samples=256, batch_size=micro)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulation,
        limit_val_batches=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLPClassifier(), data)
    assert timer.seconds_per_step is not None
    return timer.seconds_per_step, clock.seconds / args.steps


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    configurations = [(False, 1), (True, 1)]
    if args.accumulation > 1:
        configurations += [(False, args.accumulation), (True, args.accumulation)]
    times: dict[tuple[bool, int], list[float]] = {c: [] for c in configurations}
    own: dict[int, list[float]] = {k: [] for _, k in configurations}  # callback seconds / step seconds, per run
    for repeat in range(args.repeats):
        for configuration in configurations:  # alternate, so drifting load hits every configuration alike
            step, callback = run(args, *configuration)
            times[configuration].append(step)
            if configuration[0]:
                own[configuration[1]].append(callback / step)
        print(f"[gns_overhead] run {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    for accumulation in sorted({k for _, k in configurations}):
        base = statistics.median(times[(False, accumulation)])
        gns = statistics.median(times[(True, accumulation)])
        rows.append(
            {
                "accumulation": accumulation,
                "source": "consecutive_steps" if accumulation == 1 else "micro_batches",
                "baseline_ms": base * 1e3,
                "gns_ms": gns * 1e3,
                "overhead": gns / base - 1,
                "fastest_overhead": min(times[(True, accumulation)]) / min(times[(False, accumulation)]) - 1,
                "own_fraction": statistics.median(own[accumulation]),
                "baseline_runs_ms": [t * 1e3 for t in times[(False, accumulation)]],
                "gns_runs_ms": [t * 1e3 for t in times[(True, accumulation)]],
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace, device: str) -> str:
    lines = [
        f"GradientNoiseScale overhead: MLPClassifier, batch {args.batch_size}, one process, {device}, "
        f"median of {args.repeats} runs × {args.steps} steps, measuring one step in {args.measure_every}",
        "",
        "| accumulation | measured from | step without (ms) | step with (ms) | A/B, medians | A/B, fastest runs "
        "| callback's own time | goal ≤ 5% (own time) |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        held = "held" if row["own_fraction"] <= GOAL else "missed"
        lines.append(
            f"| {row['accumulation']} | {row['source']} | {row['baseline_ms']:.2f} | {row['gns_ms']:.2f} | "
            f"{row['overhead']:+.1%} | {row['fastest_overhead']:+.1%} | {row['own_fraction']:.1%} | {held} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="runs per configuration")
    parser.add_argument("--accumulation", type=int, default=2, help="also measure K micro-batches (1: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument(
        "--measure-every", type=int, default=4, help="GradientNoiseScale(measure_every_n_steps=N): one step in N"
    )
    parser.add_argument("--quick", action="store_true", help="smoke check: 2 runs of 50 steps")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 50, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.accelerator == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"CPU, {torch.get_num_threads()} thread(s)"
    started = time.perf_counter()
    rows = measure(args)
    table = markdown_table(rows, args, device)
    print(table)
    if args.out:
        doc = {
            "benchmark": "gns_overhead",
            "device": device,
            "args": vars(args),
            "rows": rows,
            "markdown": table,
            "seconds": time.perf_counter() - started,
            "machine": machine_info(),
        }
        Path(args.out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
