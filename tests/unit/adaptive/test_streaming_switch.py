"""AdaptiveBatchSize with ShardedStreamingDataModule: the batch size changes mid-epoch, each sample once.

One process, real Trainers on both Lightning packages; a checkpoint taken after the change resumes with the
changed batch size and finishes the epoch without losing or repeating a sample.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_patterns.data.shards import write_dataset

if TYPE_CHECKING:
    from tests.conftest import LightningPackage

N = 600
QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "limit_val_batches": 1,
    "num_sanity_val_steps": 0,
}


class _Samples:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(i)
        label = i % 4
        image = (rng.normal(size=(4, 4)) + label).astype(np.float32)
        return {"index": np.int64(i), "image": image, "label": np.int64(label)}


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("adaptive_stream") / "data")
    write_dataset(_Samples(), url, num_shards=4, progress=False)
    return url


def _model(lightning: LightningPackage, rows: list[tuple[int, int, int, int, list[int]]]) -> Any:
    class Recording(lightning.pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(16, 4)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            trainer = self.trainer
            rows.append(
                (
                    trainer.current_epoch,
                    batch_idx,
                    len(batch["index"]),
                    trainer.accumulate_grad_batches,
                    batch["index"].tolist(),
                )
            )
            logits = self.linear(batch["image"].float().flatten(1))
            return nn.functional.cross_entropy(logits, batch["label"])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            """Validation runs (it rebuilds nothing of the training stream); nothing to check in it."""

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Recording()


class _SaveAt:
    """Saves a checkpoint at the end of one training batch, as ModelCheckpoint(every_n_train_steps) does."""

    def __init__(self, batch_idx: int, path: Path) -> None:
        self.batch_idx, self.path = batch_idx, path
        self.adaptive_state: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_batch_size_changes_mid_epoch_and_resumes(
    lightning_package: LightningPackage, dataset_url: str, tmp_path: Path
) -> None:
    pl, classes = lightning_package.pl, lightning_package.classes

    def fit(rows: list[Any], callbacks: list[Any], ckpt: str | None = None, max_epochs: int = 2) -> tuple[Any, Any]:
        torch.manual_seed(0)
        adaptive = classes.AdaptiveBatchSize(adapt_every_n_steps=4, min_batch_size=96, max_batch_size=96)
        data = classes.ShardedStreamingDataModule(
            train_url=dataset_url, val_url=dataset_url, batch_size=32, shuffle=True, seed=1
        )
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[adaptive, *callbacks], **QUIET)
        trainer.fit(_model(lightning_package, rows), data, ckpt_path=ckpt)
        return adaptive, data

    rows: list[tuple[int, int, int, int, list[int]]] = []
    adaptive, data = fit(rows, [])
    decision = adaptive.decisions[0]
    micro, accumulation = int(decision["micro_batch_size"]), int(decision["accumulation"])
    assert micro * accumulation == 96
    epoch0 = [row for row in rows if row[0] == 0]
    # One process: first 2 micro-batches of 16; the change comes within the first epoch, on a step boundary.
    switch = next(i for i, row in enumerate(epoch0) if row[2] != 16)
    assert epoch0[0][2:4] == (16, 2)
    assert switch % accumulation == 0
    assert switch % 2 == 0
    assert 0 < switch < len(epoch0) - 1
    assert all(row[2:4] == (micro, accumulation) for row in epoch0[switch:-1])
    assert [row[1] for row in epoch0] == list(range(len(epoch0)))
    # Each sample of the epoch exactly once, in the epoch with the change and in the next.
    for epoch in (0, 1):
        seen = Counter(i for row in rows if row[0] == epoch for i in row[4])
        assert seen == Counter(range(N)), f"epoch {epoch}"
    assert data.batch_size == micro
    # The Trainer counted the epoch's true number of batches (it changed with the batch size).
    assert len(epoch0) == 2 + (switch - 2) + -(-(N - 16 * switch) // micro)

    # A checkpoint a few batches after the change: resume continues with the new batch size and the noise scale.
    path = tmp_path / "switched.ckpt"
    first: list[tuple[int, int, int, int, list[int]]] = []
    saved_at = switch + 2 * accumulation - 1
    fit(first, [type("SaveAt", (_SaveAt, pl.Callback), {})(saved_at, path)], max_epochs=1)
    resumed_rows: list[tuple[int, int, int, int, list[int]]] = []
    resumed, resumed_data = fit(resumed_rows, [], ckpt=str(path), max_epochs=1)
    assert resumed_data.batch_size == micro
    assert (resumed.micro_batch_size, resumed.accumulation) == (micro, accumulation)
    # The noise-scale averages came back: they hold more measurements than the resumed run's steps could give.
    assert resumed.ema.count > -(-len(resumed_rows) // accumulation)
    assert resumed_rows[0][1] == saved_at + 1
    assert all(row[2:4] == (micro, accumulation) for row in resumed_rows[:-1])
    before = [i for row in first if row[1] <= saved_at for i in row[4]]
    after = [i for row in resumed_rows for i in row[4]]
    assert Counter(before + after) == Counter(range(N))
