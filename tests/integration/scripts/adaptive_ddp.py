"""GradientNoiseScale / AdaptiveBatchSize under DDP (gloo, CPU); run by tests/integration/test_adaptive_ddp.py.

Usage (under torchrun, 2 processes): adaptive_ddp.py OUT_DIR DATASET_URL

1. Fits linear regression with SGD(lr=0), so the weights stay where the exact |G|² and tr(Σ) are known, with
   AdaptiveBatchSize (min_batch_size above the first batch, so it must change it at its first decision).
2. Fits again with a communication hook already registered on the DDP model, expecting the callback's error.
3. Streams DATASET_URL (``index``, ``image``, ``label``) through ShardedStreamingDataModule with AdaptiveBatchSize,
   which changes the batch size in the middle of the first epoch; a checkpoint taken after the change is resumed
   by a fourth fit.

Writes OUT_DIR/rank{R}.json: the source, the estimates, the exact values, each step's (epoch, micro-batch size,
accumulation), the decisions, the second fit's error, and the streamed fits' batches
(epoch, batch_idx, size, accumulation, sample indices).
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
from lightning_patterns.data import ShardedStreamingDataModule
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
        if at_batch is not None:  # as the protocol asks: the callback then changes it from the next epoch
            raise ValueError(f"RegressionData changes its batch size between epochs only, got at_batch={at_batch}.")
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


class Streamed(pl.LightningModule):
    """Classifies the streamed 4×4 images and records every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)
        self.rows: list[tuple[int, int, int, int, list[int]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        k = self.trainer.accumulate_grad_batches
        self.rows.append((self.current_epoch, batch_idx, len(batch["index"]), k, batch["index"].tolist()))
        return nn.functional.cross_entropy(self.linear(batch["image"].float().flatten(1)), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SaveAt(pl.Callback):
    def __init__(self, batch_idx: int, path: Path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def streamed_fits(url: str, out: Path) -> dict[str, Any]:
    """Fits 3 and 4: a mid-epoch change under DDP, then a checkpoint after it resumed."""

    def fit(callbacks: list[pl.Callback], max_epochs: int, ckpt: str | None = None) -> tuple[Streamed, Any]:
        torch.manual_seed(0)
        adaptive = AdaptiveBatchSize(adapt_every_n_steps=4, min_batch_size=64, max_batch_size=64, max_accumulation=1)
        model = Streamed()
        data = ShardedStreamingDataModule(train_url=url, batch_size=16, seed=1)
        trainer([adaptive, *callbacks], max_epochs=max_epochs).fit(model, data, ckpt_path=ckpt)
        return model, adaptive

    model, adaptive = fit([], max_epochs=2)
    switch = next(row[1] for row in model.rows if row[2] != 16)
    path = out / "switched.ckpt"
    before, _ = fit([SaveAt(switch + 2, path)], max_epochs=1)
    resumed, resumed_adaptive = fit([], max_epochs=1, ckpt=str(path))
    return {
        "rows": model.rows,
        "decisions": adaptive.decisions,
        "saved_at": switch + 2,
        "before": before.rows,
        "resumed": resumed.rows,
        "resumed_config": [resumed_adaptive.micro_batch_size, resumed_adaptive.accumulation],
    }


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
    record["streamed"] = streamed_fits(sys.argv[2], out)
    Path(out, f"rank{fit.global_rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
