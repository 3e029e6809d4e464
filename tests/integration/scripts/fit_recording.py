"""Fit a model that records the sample indices it trains on; run by the integration tests in real processes.

Usage: fit_recording.py DATA_URL OUT_DIR DEVICES [--ckpt PATH] [--stop-at-step N] [--save-every N]
Writes OUT_DIR/seen-rank{R}.json with the indices rank R trained on, and the number of batches per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_patterns.data.datamodule import ShardedStreamingDataModule


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 10)
        self.seen: list[int] = []
        self.batches_per_epoch: dict[int, int] = {}
        self.min_class_counts: list[int] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen += batch["index"].tolist()
        self.min_class_counts.append(int(torch.bincount(batch["label"], minlength=10).min()))
        epoch = self.current_epoch
        self.batches_per_epoch[epoch] = self.batches_per_epoch.get(epoch, 0) + 1
        logits = self.linear(batch["image"].float().flatten(1))
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("devices", type=int)
    parser.add_argument("--ckpt")
    parser.add_argument("--stop-at-step", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--min-per-class", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callbacks: list[pl.Callback] = []
    if args.stop_at_step:
        callbacks.append(StopAt(args.stop_at_step))
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out, every_n_train_steps=args.save_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.save_every),
        callbacks=callbacks,
    )
    model = Recorder()
    data = ShardedStreamingDataModule(
        args.url, batch_size=16, seed=5, num_workers=args.num_workers, min_per_class=args.min_per_class
    )
    trainer.fit(model, data, ckpt_path=args.ckpt)
    rank = trainer.global_rank
    record = {
        "seen": model.seen,
        "batches_per_epoch": model.batches_per_epoch,
        "global_step": trainer.global_step,
        "min_class_counts": model.min_class_counts,
    }
    Path(args.out, f"seen-rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
