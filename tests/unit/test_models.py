from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.data.synthetic import fashion_like_arrays
from lightning_patterns.models import CNNClassifier, MLPClassifier


@pytest.mark.parametrize("model_class", [MLPClassifier, CNNClassifier])
def test_logits_shape_for_uint8_and_float_images(model_class: type[Any]) -> None:
    model = model_class()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert model(images.float() / 255).shape == (5, 10)
    prediction = model.predict_step({"image": images, "label": torch.zeros(5)}, 0)
    assert prediction.shape == (5,)
    assert prediction.dtype == torch.int64


@pytest.mark.parametrize(
    ("model_class", "kwargs", "message"),
    [
        (MLPClassifier, {"lr": 0.0}, r"`lr` must be positive, got lr=0.0"),
        (MLPClassifier, {"optimizer": "rmsprop"}, r"`optimizer` must be 'adam' or 'sgd', got optimizer='rmsprop'"),
        (MLPClassifier, {"hidden_dim": 0}, r"hidden_dim=0"),
        (MLPClassifier, {"num_layers": 0}, r"num_layers=0"),
        (CNNClassifier, {"channels": 0}, r"channels=0"),
        (CNNClassifier, {"hidden_dim": -1}, r"hidden_dim=-1"),
    ],
)
def test_invalid_arguments(model_class: type[Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_class(**kwargs)


@pytest.mark.parametrize(
    ("model_name", "optimizer", "lr"), [("MLPClassifier", "sgd", 0.02), ("CNNClassifier", "adam", 0.003)]
)
def test_trains_on_tuple_batches_and_lowers_the_loss(
    lightning_package: Any, model_name: str, optimizer: str, lr: float
) -> None:
    torch.manual_seed(0)
    images, labels = (torch.from_numpy(array) for array in fashion_like_arrays(256))
    model = getattr(lightning_package.classes, model_name)(lr=lr, optimizer=optimizer)
    pl = lightning_package.pl
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(images.float() / 255), labels).item()
    trainer = pl.Trainer(
        max_epochs=12,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(images.float() / 255), labels).item()
    assert after < before * 0.7
