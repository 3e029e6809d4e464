"""Fit from IDX files over HTTP with the IDXDataModule, recording which samples each rank trained on per epoch.

Usage: idx_ddp.py IMAGES_URL LABELS_URL OUT_DIR CACHE_DIR DEVICES
Each image carries its sample index in its first two pixels (big-endian). Writes OUT_DIR/idx-rank{R}.json with
the indices per epoch, the batches per epoch and (all ranks together) the remote bytes of every epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_patterns.callbacks import DataMetricsCallback
from lightning_patterns.data.idx_datamodule import IDXDataModule


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 10)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = batch["image"].long()
        self.seen.setdefault(self.current_epoch, []).extend((image[:, 0, 0] * 256 + image[:, 0, 1]).tolist())
        logits = self.linear(batch["image"][:, :4, :4].float().flatten(1))
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log(
            "val_loss",
            torch.nn.functional.cross_entropy(
                self.linear(batch["image"][:, :4, :4].float().flatten(1)), batch["label"]
            ),
            sync_dist=True,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("images")
    parser.add_argument("labels")
    parser.add_argument("out")
    parser.add_argument("cache_dir")
    parser.add_argument("devices", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    metrics = DataMetricsCallback(print_summary=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,  # so that the first training epoch is the first to read the pair
        callbacks=[metrics],
    )
    model = Recorder()
    data = IDXDataModule(
        args.images,
        args.labels,
        args.images,
        args.labels,
        batch_size=50,
        shuffle=True,
        seed=7,
        span_samples=100,
        cache="disk",
        cache_dir=args.cache_dir,
    )
    trainer.fit(model, data)
    record = {
        "seen": model.seen,
        "batches": {epoch: len(indices) // 50 for epoch, indices in model.seen.items()},
        "epochs": [dataclasses.asdict(epoch) for epoch in metrics.epochs],
        "val_samples": data.loaders["val"].metrics()["samples"],
    }
    Path(args.out, f"idx-rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
