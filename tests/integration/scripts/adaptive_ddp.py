"""GradientNoiseScale / AdaptiveBatchSize under DDP (gloo, CPU); run by tests/integration/test_adaptive_ddp.py.

Usage (under torchrun, 2 processes): adaptive_ddp.py OUT_DIR

1. Fits linear regression with SGD(lr=0), so the weights stay where the exact |G|² and tr(Σ) are known, with
   AdaptiveBatchSize (min_batch_size above the first batch, so it must change it at its first decision).
2. Fits again with a communication hook already registered on the DDP model, expecting the callback's error.

Writes OUT_DIR/rank{R}.json: the source, the estimates, the exact values, each step's (epoch, micro-batch size,
accumulation), the decisions, and the second fit's error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.callbacks import AdaptiveBatchSize, GradientNoiseScale
from lightning_patterns.testing.gradient_noise import LinearRegressionNoise

PROBLEM = LinearRegressionNoise(num_samples=4096, dim=8, noise=1.0, offset=0.5, seed=0)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(PROBLEM.dim, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(PROBLEM.weights[None])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * ((self.linear(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class RegressionData(pl.LightningDataModule):
    """Implements BatchSizeAdjustable between epochs, like InMemoryDataModule."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def set_batch_size(self, batch_size: int, at_batch: int | None = None) -> None:
        assert at_batch is None
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        data = TensorDataset(PROBLEM.inputs, PROBLEM.targets)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)  # Lightning adds a DistributedSampler


class Steps(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.rows.append((trainer.current_epoch, len(batch[0]), trainer.accumulate_grad_batches))


class HookFirst(pl.Callback):
    """Registers a communication hook before GradientNoiseScale can."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.strategy.model.register_comm_hook(None, allreduce_hook)


def trainer(callbacks: list[pl.Callback], max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0)
    adaptive = AdaptiveBatchSize(adapt_every_n_steps=100, min_batch_size=64, max_batch_size=64, smoothing=0.995)
    steps = Steps()
    fit = trainer([adaptive, steps], max_epochs=6)
    fit.fit(Regression(), RegressionData(batch_size=16))
    exact = PROBLEM.exact()
    record: dict[str, Any] = {
        "world_size": fit.world_size,
        "source": adaptive.source_name,
        "grad_sqr": adaptive.stats.grad_sqr,
        "grad_var": adaptive.stats.grad_var,
        "noise_scale": adaptive.noise_scale,
        "measurements": adaptive.ema.count,
        "exact": {"grad_sqr": exact.grad_sqr, "grad_var": exact.grad_var, "noise_scale": exact.noise_scale},
        "base_batch_size": adaptive.base_batch_size,
        "decisions": adaptive.decisions,
        "steps": steps.rows,
    }
    try:
        trainer([HookFirst(), GradientNoiseScale()], max_epochs=1).fit(Regression(), RegressionData(batch_size=16))
        record["hook_error"] = None
    except RuntimeError as error:
        record["hook_error"] = str(error)
    Path(out, f"rank{fit.global_rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
