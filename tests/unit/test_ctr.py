"""EmbeddingCTR: tables built in configure_model, trains on click-through data, logs the epoch's AUC exactly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_patterns.data.click_through import ClickThroughModel, click_through_arrays
from lightning_patterns.metrics import binary_auc
from lightning_patterns.models import EmbeddingCTR
from lightning_patterns.strategies.parameter_server.sparse import RowAdagrad, row_optimizer_from_torch

GENERATOR = ClickThroughModel(num_users=50, num_items=300, latent_dim=2, seed=1)


class _Impressions(Dataset[dict[str, torch.Tensor]]):
    """Click-through samples as dicts, the way the shard reader yields them."""

    def __init__(self, count: int, split: str) -> None:
        self.arrays = {
            name: torch.from_numpy(array) for name, array in click_through_arrays(GENERATOR, count, split=split).items()
        }

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: array[index] for name, array in self.arrays.items()}


def test_tables_are_built_in_configure_model_once() -> None:
    model = EmbeddingCTR(num_embeddings=[50, 300], embedding_dim=8)
    assert model.tables is None  # a strategy may build them its own way
    model.configure_model()
    tables = model.tables
    assert tables is not None
    assert [t.weight.shape for t in tables] == [(50, 8), (300, 8)]
    assert all(t.sparse for t in tables)
    model.configure_model()
    assert model.tables is tables
    lazy = EmbeddingCTR(num_embeddings=[50, 300])
    ids, dense = torch.tensor([[1, 2], [3, 299]]), torch.zeros(2, 4)
    assert lazy(ids, dense).shape == (2,)  # used outside a Trainer, the first forward builds the tables


def test_param_groups_are_what_the_parameter_server_maps() -> None:
    """The tables are a param group of their own, which the strategy will map to a row-wise optimizer."""
    model = EmbeddingCTR(num_embeddings=[50, 300], lr=0.01, embedding_lr=0.2)
    optimizer = model.configure_optimizers()
    tables, dense = optimizer.param_groups
    assert model.tables is not None
    assert {id(p) for p in tables["params"]} == {id(p) for p in model.tables.parameters()}
    assert len(dense["params"]) == len(list(model.parameters())) - 2
    assert row_optimizer_from_torch(type(optimizer), tables) == RowAdagrad(lr=0.2)
    adam = EmbeddingCTR(optimizer="adam")
    adam.configure_model()
    assert adam.tables is not None
    assert not any(t.sparse for t in adam.tables)
    assert isinstance(adam.configure_optimizers(), torch.optim.Adam)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings": []}, "`num_embeddings` must list the positive number of rows of each table"),
        ({"num_embeddings": [10, 0]}, "`num_embeddings` must list"),
        ({"embedding_dim": 0}, "`embedding_dim` must be at least 1"),
        ({"hidden_dim": 0}, "`hidden_dim` must be at least 1"),
        ({"lr": 0}, "Learning rates must be positive"),
        ({"embedding_lr": -1.0}, "Learning rates must be positive"),
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of adagrad, adam, sgd"),
        ({"optimizer": "adam", "sparse_gradients": True}, "Set sparse_gradients=False, or use optimizer='adagrad'"),
        ({"init_std": -1.0}, "`init_std` must be >= 0"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EmbeddingCTR(**kwargs)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {"ids": torch.zeros(4, 3, dtype=torch.int64)},
            "expects ids of shape [batch, 2] (one column per table), got (4, 3)",
        ),
        (
            {"ids": torch.tensor([[0, 5], [49, 300]])},
            "got ids up to [49, 300] per column (smallest 0); ids must lie in [0, rows) of their table. Size the "
            "tables for the data: --model.init_args.num_embeddings='[50, 301]'",
        ),
        (
            {"dense": torch.zeros(2, 3)},
            "EmbeddingCTR(num_dense=4) got dense features of shape (2, 3). Set --model.init_args.num_dense=3",
        ),
    ],
)
def test_data_of_another_shape_fails_at_the_first_batch_with_the_fix(
    batch: dict[str, torch.Tensor], message: str
) -> None:
    rows = next(iter(batch.values())).shape[0]
    full = {"ids": torch.zeros(rows, 2, dtype=torch.int64), "dense": torch.zeros(rows, 4), "label": torch.zeros(rows)}
    model = EmbeddingCTR(num_embeddings=[50, 300])
    model.configure_model()
    with pytest.raises(ValueError, match=re.escape(message)):
        model.predict_step({**full, **batch}, 0)


def test_learns_clicks_and_logs_the_epochs_auc_beside_the_generating_models(
    lightning_package: Any, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    train, val = _Impressions(30_000, "train"), _Impressions(4_000, "val")
    model = lightning_package.classes.EmbeddingCTR(num_embeddings=[50, 300], embedding_dim=8, hidden_dim=16, lr=0.05)
    trainer = lightning_package.pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(train, batch_size=256, shuffle=True), DataLoader(val, batch_size=1_000))
    metrics = trainer.callback_metrics
    reference = binary_auc(val.arrays["probability"], val.arrays["label"]).item()
    assert metrics["val_reference_auc"].item() == pytest.approx(reference, abs=1e-6)
    # The logged AUC is the whole epoch's (4 batches gathered), not a mean of per-batch AUCs.
    model.eval()
    with torch.no_grad():
        logits = model(val.arrays["ids"], val.arrays["dense"])
    assert metrics["val_auc"].item() == pytest.approx(binary_auc(logits, val.arrays["label"]).item(), abs=1e-6)
    assert metrics["val_auc"].item() > 0.7
    assert metrics["val_auc"].item() > reference - 0.06

    # A checkpoint loads back: Lightning calls configure_model before restoring the tables.
    path = tmp_path / "ctr.ckpt"
    trainer.save_checkpoint(path)
    restored = type(model).load_from_checkpoint(path)
    assert restored.tables is not None
    for ours, theirs in zip(model.tables, restored.tables, strict=True):
        assert torch.equal(ours.weight, theirs.weight)
