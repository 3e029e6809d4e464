"""Benchmark: training time to a target validation accuracy, fixed batch sizes against ``AdaptiveBatchSize``.

Issue 15's goals: the adaptive run reaches the target in at most 1.1× the time of the best fixed batch size and
at most 0.7× the median fixed one. Every run trains the demo model (``MLPClassifier``, SGD) from the same seed on
the embedded Fashion-MNIST-shaped data, streamed by ``ShardedStreamingDataModule`` (memory cache), one process:

- fixed batch sizes 32, 64, ..., 1024, the learning rate scaled linearly from the one for 32
  (``lr = base_lr · b / 32``);
- ``AdaptiveBatchSize`` starting at 32 with ``base_lr``, free to choose 32 ... 1024 (mid-epoch changes, AdaScale's
  gain on the learning rate).

Validation runs every ``--val-every`` training samples; the clock counts training only (validation excluded), and
a run stops at its first validation at or above the target (or after ``--max-epochs``). Writes a JSON result, a
plot of validation accuracy over training time, and the adaptive run's ``gns.png``.

    python benchmarks/time_to_accuracy.py                  # the full comparison (tens of minutes on 2 CPU cores)
    python benchmarks/time_to_accuracy.py --quick          # smoke check: 64, 128 and adaptive, low target
    python benchmarks/time_to_accuracy.py --out PATH       # JSON result (plots beside it)
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

from lightning_patterns.callbacks import AdaptiveBatchSize
from lightning_patterns.data import ShardedStreamingDataModule
from lightning_patterns.data.embedded import EmbeddedFashionMNIST
from lightning_patterns.models import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loading import machine_info

BEST_GOAL = 1.1
MEDIAN_GOAL = 0.7
RESULTS = Path(__file__).resolve().parent / "results"


class TimeToAccuracy(pl.Callback):
    """Training seconds (validation excluded) until the first validation with ``val_acc >= target``."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.training_seconds = 0.0
        self.reached: float | None = None
        self.curve: list[tuple[float, float, int]] = []  # (training seconds, val_acc, samples seen)
        self._since: float | None = None
        self.samples = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._since is None:
            self._since = time.perf_counter()
        self.samples += len(batch["label"])

    def _pause(self) -> None:
        if self._since is not None:
            self.training_seconds += time.perf_counter() - self._since
            self._since = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = float(trainer.callback_metrics["val_acc"])
        self.curve.append((self.training_seconds, accuracy, self.samples))
        if accuracy >= self.target and self.reached is None:
            self.reached = self.training_seconds
            trainer.should_stop = True


def run(args: argparse.Namespace, batch_size: int | None, plot: Path | None) -> dict[str, Any]:
    """One training run: a fixed ``batch_size``, or ``None`` for AdaptiveBatchSize."""
    pl.seed_everything(args.seed, verbose=False)
    timer = TimeToAccuracy(args.target)
    callbacks: list[pl.Callback] = [timer]
    adaptive: AdaptiveBatchSize | None = None
    if batch_size is None:
        adaptive = AdaptiveBatchSize(
            min_batch_size=args.batch_sizes[0],
            max_batch_size=args.batch_sizes[-1],
            max_accumulation=4,
            adapt_every_n_steps=args.adapt_every,
            measure_every_n_steps=1,
            plot=str(plot) if plot is not None else None,
        )
        callbacks.insert(0, adaptive)
    first = batch_size or args.batch_sizes[0]
    lr = args.base_lr * (batch_size or args.batch_sizes[0]) / args.batch_sizes[0]
    data = ShardedStreamingDataModule(
        embedded=EmbeddedFashionMNIST(train_samples=args.train_samples, val_samples=args.val_samples, seed=0),
        batch_size=first,
        eval_batch_size=1000,
        shuffle=True,
        seed=args.seed,
        cache="memory",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.max_epochs,
        val_check_interval=min(1.0, args.val_every / args.train_samples),
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(RESULTS),
    )
    started = time.perf_counter()
    trainer.fit(MLPClassifier(optimizer="sgd", lr=lr), data)
    row: dict[str, Any] = {
        "config": "adaptive" if batch_size is None else f"fixed {batch_size}",
        "batch_size": batch_size,
        "lr": lr,
        "seconds": timer.reached,
        "training_seconds": timer.training_seconds,
        "wall_seconds": time.perf_counter() - started,
        "best_val_acc": max((acc for _, acc, _ in timer.curve), default=0.0),
        "samples": timer.samples,
        "curve": timer.curve,
    }
    if adaptive is not None:
        row["decisions"] = adaptive.decisions
        # What the decisions rested on: (m, K, median step seconds, steps kept) and the noise scale over the steps.
        row["step_times"] = adaptive.step_times.summary()
        row["noise_scale"] = [(int(h["step"]), h["batch_size"], h["noise_scale"]) for h in adaptive.history]
    print(f"[time_to_accuracy] {row['config']}: {timer.reached} s to {args.target}", flush=True)
    return row


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    fixed = [row["seconds"] for row in rows if row["batch_size"] is not None]
    adaptive = next(row["seconds"] for row in rows if row["batch_size"] is None)
    # A fixed size that never reached the target counts as infinitely slow (it is one of the candidates).
    times = [t if t is not None else float("inf") for t in fixed]
    best, median = min(times), statistics.median(times)
    return {
        "best_fixed_seconds": best,
        "median_fixed_seconds": median,
        "adaptive_seconds": adaptive,
        "adaptive_over_best": None if adaptive is None else adaptive / best,
        "adaptive_over_median": None if adaptive is None else adaptive / median,
        "best_goal_held": adaptive is not None and adaptive <= BEST_GOAL * best,
        "median_goal_held": adaptive is not None and adaptive <= MEDIAN_GOAL * median,
    }


def markdown_table(rows: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Time to validation accuracy {args.target} (training seconds, validation excluded): MLPClassifier, SGD, "
        f"embedded data ({args.train_samples:,} train / {args.val_samples:,} val), one process, seed {args.seed}",
        "",
        "| run | lr | time to target (s) | samples seen | best val acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        seconds = "not reached" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(
            f"| {row['config']} | {row['lr']:.3g} | {seconds} | {row['samples']:,} | {row['best_val_acc']:.3f} |"
        )

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    lines += [
        "",
        f"adaptive / best fixed = {ratio(summary['adaptive_over_best'])} (goal ≤ {BEST_GOAL}×: "
        f"{'held' if summary['best_goal_held'] else 'missed'}); adaptive / median fixed = "
        f"{ratio(summary['adaptive_over_median'])} (goal ≤ {MEDIAN_GOAL}×: "
        f"{'held' if summary['median_goal_held'] else 'missed'})",
    ]
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], target: float, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    for row in rows:
        seconds = [t for t, _, _ in row["curve"]]
        accuracy = [a for _, a, _ in row["curve"]]
        style = {"linewidth": 2.5, "color": "black"} if row["batch_size"] is None else {"linewidth": 1.2}
        ax.plot(seconds, accuracy, marker="o", markersize=3, label=row["config"], **style)
    ax.axhline(target, linestyle="--", color="grey")
    ax.set_xlabel("training seconds (validation excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Time to accuracy: fixed batch sizes (lr scaled linearly) and AdaptiveBatchSize")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.85, help="validation accuracy to reach")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--base-lr", type=float, default=0.005, help="SGD learning rate of the smallest batch size")
    parser.add_argument("--train-samples", type=int, default=60_000)
    parser.add_argument("--val-samples", type=int, default=10_000)
    parser.add_argument("--val-every", type=int, default=15_000, help="training samples between validations")
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--adapt-every", type=int, default=50, help="AdaptiveBatchSize(adapt_every_n_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke check: batch 64 and 128, target 0.7")
    parser.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/time_to_accuracy.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.target, args.train_samples, args.val_samples = [64, 128], 0.7, 8_000, 2_000
        args.val_every, args.max_epochs, args.adapt_every = 4_000, 3, 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / "time_to_accuracy.json"
    rows = [run(args, size, None) for size in args.batch_sizes]
    rows.append(run(args, None, out.with_name(out.stem + "_gns.png")))
    summary = verdict(rows)
    table = markdown_table(rows, summary, args)
    print(table, flush=True)
    plot_curves(rows, args.target, out.with_suffix(".png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "args": vars(args), "rows": rows, "summary": summary, "markdown": table}
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
