"""Small example classifiers for images of a fixed shape (``input_shape``, 28×28 by default) and ``num_classes``.

They are ordinary LightningModules: they know nothing of sharding, streaming, caching or parameter
servers. That is the point: every pattern in this package drops into modules like these unchanged.
A batch is either a mapping with ``"image"`` and ``"label"`` (what our datasets yield) or an
``(images, labels)`` pair (what a ``TensorDataset`` yields). Images may be ``uint8`` (scaled to [0, 1]
here) or floating point. The first batch is checked against ``input_shape`` and ``num_classes``, so data of
another shape fails with both shapes named instead of a matrix-multiplication error deep in the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_patterns import _lightning

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule as _LightningModule
else:
    _LightningModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["CNNClassifier", "EmbeddingCTR", "ImageClassifier", "MLPClassifier"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["ImageClassifier", "MLPClassifier", "CNNClassifier", "EmbeddingCTR"])

IMAGE_SIDE = 28
NUM_CLASSES = 10


class _ImageClassifier(_LightningModule):
    """Shared training logic: cross-entropy loss, accuracy, and a configurable optimizer.

    Args:
        input_shape: the shape of one image, as the data gives it (``(28, 28)``, or ``(3, 32, 32)`` with channels).
        num_classes: the number of classes; labels are ``0 .. num_classes - 1``.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
        num_classes: int = NUM_CLASSES,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__.lstrip("_")
        if isinstance(input_shape, (str, bytes)) or not input_shape or any(int(n) < 1 for n in input_shape):
            raise ValueError(
                f"`input_shape` must be the positive sizes of one image, e.g. (28, 28), got "
                f"input_shape={input_shape!r}. "
                f"Set it to your data's image shape: {name}(input_shape=(8, 8)), or "
                f"--model.init_args.input_shape='[8, 8]' on the command line."
            )
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got num_classes={num_classes!r}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got lr={lr!r}.")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got optimizer={optimizer!r}.")
        self.input_shape = tuple(int(n) for n in input_shape)
        self.num_classes = num_classes
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._data_checked = False

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

    def _accepts(self, image_shape: tuple[int, ...]) -> bool:
        """Whether images of ``image_shape`` (one sample) fit the network."""
        return image_shape == self.input_shape

    def _check_data(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """On the first batch: images of ``input_shape`` and labels below ``num_classes``, or a clear error."""
        if self._data_checked:
            return
        name = type(self).__name__.lstrip("_")
        image_shape = tuple(images.shape[1:])
        if not self._accepts(image_shape):
            shape = list(image_shape)
            raise ValueError(
                f"{name}(input_shape={self.input_shape}) got a batch of images of shape {image_shape} "
                f"(batch shape {tuple(images.shape)}). Set `input_shape` to the data's: {name}(input_shape={shape}), "
                f"or --model.init_args.input_shape='{shape}' on the command line."
            )
        if labels is not None and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(
                f"{name}(num_classes={self.num_classes}) got labels from {int(labels.min())} to {int(labels.max())}; "
                f"expected 0 to {self.num_classes - 1}. Set `num_classes` to the data's number of classes, e.g. "
                f"--model.init_args.num_classes={int(labels.max()) + 1}."
            )
        self._data_checked = True

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = self._unpack(batch)
        self._check_data(images, labels)
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
        self._check_data(images, None)
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
    """A multi-layer perceptron over flattened images.

    Args:
        hidden_dim: width of each hidden layer.
        num_layers: number of hidden layers.
        input_shape: the shape of one image (any number of dimensions; flattened).
        num_classes: the number of classes.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        hidden_dim: int = 128,
        num_layers: int = 2,
        input_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
        num_classes: int = NUM_CLASSES,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        if hidden_dim < 1 or num_layers < 1:
            raise ValueError(
                f"`hidden_dim` and `num_layers` must be at least 1, got hidden_dim={hidden_dim!r}, "
                f"num_layers={num_layers!r}."
            )
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(self.input_shape)
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(images)  # type: ignore[no-any-return]


class _CNNClassifier(_ImageClassifier):
    """A two-block convolutional network.

    Args:
        channels: channels of the first convolution (the second has twice as many).
        hidden_dim: width of the dense layer before the classifier.
        input_shape: ``(height, width)`` of one-channel images, or ``(channels, height, width)``; at least 4×4.
        num_classes: the number of classes.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: momentum for SGD.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        channels: int = 16,
        hidden_dim: int = 64,
        input_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
        num_classes: int = NUM_CLASSES,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        if channels < 1 or hidden_dim < 1:
            raise ValueError(
                f"`channels` and `hidden_dim` must be at least 1, got channels={channels!r}, hidden_dim={hidden_dim!r}."
            )
        if len(self.input_shape) not in (2, 3) or min(self.input_shape[-2:]) < 4:
            raise ValueError(
                f"CNNClassifier needs input_shape=(height, width) or (channels, height, width) of at least 4×4 (it "
                f"pools twice), got input_shape={input_shape!r}. Use MLPClassifier for other shapes."
            )
        self.save_hyperparameters()
        in_channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        height, width = self.input_shape[-2] // 4, self.input_shape[-1] // 4  # two 2×2 poolings
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * height * width, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, self.num_classes),
        )

    def _accepts(self, image_shape: tuple[int, ...]) -> bool:
        """One-channel images may come with or without their channel dimension."""
        return image_shape == self.input_shape or (len(self.input_shape) == 2 and image_shape == (1, *self.input_shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        return self.net(images)  # type: ignore[no-any-return]


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    from lightning_patterns.ctr import _EmbeddingCTR as EmbeddingCTR

    ImageClassifier = _ImageClassifier
    MLPClassifier = _MLPClassifier
    CNNClassifier = _CNNClassifier
