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
        (MLPClassifier, {"input_shape": (0, 28)}, r"`input_shape` must be the positive sizes .* input_shape=\(0, 28\)"),
        (MLPClassifier, {"input_shape": ()}, r"input_shape=\(\)"),
        (MLPClassifier, {"num_classes": 1}, r"`num_classes` must be at least 2, got num_classes=1"),
        (CNNClassifier, {"input_shape": (784,)}, r"CNNClassifier needs input_shape=\(height, width\)"),
        (CNNClassifier, {"input_shape": (3, 2, 2)}, r"at least 4×4 .* input_shape=\(3, 2, 2\)"),
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


def _one_epoch_trainer() -> Any:
    # Imported here: these tests are about the models, and the Lightning package they run under is the Trainer's.
    import pytorch_lightning

    return pytorch_lightning.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (MLPClassifier(input_shape=(8, 8), num_classes=3, hidden_dim=16), (8, 8)),
        (CNNClassifier(input_shape=(8, 8), num_classes=3, channels=4), (1, 8, 8)),
        (CNNClassifier(input_shape=(3, 12, 16), num_classes=3, channels=4), (3, 12, 16)),
    ],
)
def test_other_shapes_train(model: Any, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, *shape), dtype=torch.uint8)
    labels = torch.arange(64) % 3
    trainer = _one_epoch_trainer()
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert model(images[:5].float()).shape == (5, 3)


@pytest.mark.parametrize(
    ("model", "images", "labels", "message"),
    [
        (
            MLPClassifier(),
            torch.zeros(4, 8, 8),
            torch.zeros(4, dtype=torch.int64),
            r"MLPClassifier\(input_shape=\(28, 28\)\) got a batch of images of shape \(8, 8\) .*"
            r"MLPClassifier\(input_shape=\[8, 8\]\), or --model.init_args.input_shape='\[8, 8\]'",
        ),
        (
            CNNClassifier(input_shape=(3, 8, 8)),
            torch.zeros(4, 8, 8),
            torch.zeros(4, dtype=torch.int64),
            r"got a batch of images of shape \(8, 8\)",
        ),
        (
            MLPClassifier(input_shape=(8, 8), num_classes=5),
            torch.zeros(4, 8, 8),
            torch.tensor([0, 1, 7, 2]),
            r"MLPClassifier\(num_classes=5\) got labels from 0 to 7; expected 0 to 4\. "
            r".*--model.init_args.num_classes=8",
        ),
    ],
)
def test_data_of_another_shape_fails_at_the_first_batch(
    model: Any, images: torch.Tensor, labels: torch.Tensor, message: str
) -> None:
    trainer = _one_epoch_trainer()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
