"""DataMetricsCallback under a real Trainer: epoch 2 of a cached stream reads nothing from the remote."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_patterns.callbacks import DataMetricsCallback
from lightning_patterns.data.datamodule import ShardedStreamingDataModule
from lightning_patterns.data.embedded import EmbeddedFashionMNIST
from lightning_patterns.models import MLPClassifier


@pytest.mark.slow
def test_metrics_are_logged_and_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_PATTERNS_CACHE", str(tmp_path / "home"))
    callback = DataMetricsCallback()
    data = ShardedStreamingDataModule(
        embedded=EmbeddedFashionMNIST(train_samples=2048, val_samples=256, shard_bytes=262144),
        batch_size=128,
        cache="memory",
    )
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(str(tmp_path)),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLPClassifier(hidden_dim=16), data)
    first, second = callback.epochs
    assert first.samples == second.samples == 2048
    assert first.remote_bytes > 0
    assert second.remote_bytes == 0
    assert second.cache_hit_rate == 1.0
    assert first.samples_per_rank == (2048,)
    assert 0.0 <= first.wait_fraction <= 1.0
    assert first.samples_per_second > 0
    # Each epoch's time to its first batch, as the loader saw it; epoch 2 reads the memory cache.
    assert 0 < second.first_batch_seconds < first.seconds
    assert 0 < first.first_batch_seconds < first.seconds
    assert trainer.callback_metrics["data/remote_bytes"] == 0
    summary = capsys.readouterr().out
    assert "Data pipeline" in summary
    assert "samples per rank in the last epoch: 2,048" in summary
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()  # type: ignore[union-attr]
    assert "data/samples_per_second" in logged
    assert "data/first_batch_seconds" in logged
