"""Small example classifiers for 28×28 one-channel images and 10 classes.

They are ordinary LightningModules: they know nothing of sharding, streaming, caching or parameter
servers. That is the point: every pattern in this package drops into modules like these unchanged.
A batch is either a mapping with ``"image"`` and ``"label"`` (what our datasets yield) or an
``(images, labels)`` pair (what a ``TensorDataset`` yields). Images may be ``uint8`` (scaled to [0, 1]
here) or floating point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_patterns import _lightning

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule as _LightningModule
else:
    _LightningModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["CNNClassifier", "ImageClassifier", "MLPClassifier"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(["ImageClassifier", "MLPClassifier", "CNNClassifier"])

IMAGE_SIDE = 28
NUM_CLASSES = 10


class _ImageClassifier(_LightningModule):
    """Shared training logic: cross-entropy loss, accuracy, and a configurable optimizer.

    Args:
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got lr={lr!r}.")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got optimizer={optimizer!r}.")
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        raise NotImplementedError

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            images, labels = batch["image"], batch["label"]
        else:
            images, labels = batch[0], batch[1]
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return images.float(), labels.long()

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = self._unpack(batch)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = stage == "train"
        batch_size = labels.shape[0]
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log(
            f"{stage}_acc", accuracy, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=batch_size
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Validation loss and accuracy."""
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Test loss and accuracy."""
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted class of each image."""
        images, _ = self._unpack(batch)
        logits: torch.Tensor = self(images)
        return logits.argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam or SGD over all parameters."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _MLPClassifier(_ImageClassifier):
    """A multi-layer perceptron over flattened 28×28 images.

    Args:
        hidden_dim: width of each hidden layer.
        num_layers: number of hidden layers.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        hidden_dim: int = 128,
        num_layers: int = 2,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
        if hidden_dim < 1 or num_layers < 1:
            raise ValueError(
                f"`hidden_dim` and `num_layers` must be at least 1, got hidden_dim={hidden_dim!r}, "
                f"num_layers={num_layers!r}."
            )
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = IMAGE_SIDE * IMAGE_SIDE
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(images)  # type: ignore[no-any-return]


class _CNNClassifier(_ImageClassifier):
    """A two-block convolutional network.

    Args:
        channels: channels of the first convolution (the second has twice as many).
        hidden_dim: width of the dense layer before the classifier.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        channels: int = 16,
        hidden_dim: int = 64,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
        if channels < 1 or hidden_dim < 1:
            raise ValueError(
                f"`channels` and `hidden_dim` must be at least 1, got channels={channels!r}, hidden_dim={hidden_dim!r}."
            )
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        return self.net(images)  # type: ignore[no-any-return]


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    ImageClassifier = _ImageClassifier
    MLPClassifier = _MLPClassifier
    CNNClassifier = _CNNClassifier
