"""A deterministic Fashion-MNIST-shaped dataset with learnable class structure.

Nothing is downloaded: every image is a class prototype (a smooth random pattern, fixed by ``seed``)
with per-sample brightness, shift and noise, so a small model learns it to high but not perfect
accuracy. Samples are generated in fixed-size blocks, each from its own seed, so any range of a split
can be produced without generating what comes before it and the values never depend on how the caller
slices the work.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["FashionLikeSamples", "FashionLikeSplit", "fashion_like_arrays", "iter_fashion_like"]

IMAGE_SIDE = 28
NUM_CLASSES = 10
_BLOCK = 4096
_NOISE = 70.0
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
FashionLikeSplit = str


def _prototypes(seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7919])))
    # Classes share most of their shape and differ in a smaller part, so they overlap under noise.
    shared = rng.random((1, 7, 7))
    coarse = 0.7 * shared + 0.3 * rng.random((NUM_CLASSES, 7, 7))
    # Upsample 7×7 → 28×28 so prototypes are smooth blobs, like garment silhouettes rather than noise.
    fine = coarse.repeat(4, axis=1).repeat(4, axis=2)
    return (fine * 200.0).astype(np.float32)


def _block(seed: int, split: str, block: int, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_IDS[split], block])))
    labels = rng.integers(0, NUM_CLASSES, size=_BLOCK, dtype=np.int64)
    brightness = rng.uniform(0.6, 1.2, size=(_BLOCK, 1, 1)).astype(np.float32)
    images = prototypes[labels] * brightness
    shifts = rng.integers(-2, 3, size=(_BLOCK, 2))
    for shift in np.unique(shifts, axis=0):
        rows = np.all(shifts == shift, axis=1)
        images[rows] = np.roll(images[rows], shift=tuple(shift), axis=(1, 2))
    images += rng.normal(0.0, _NOISE, size=images.shape).astype(np.float32)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def fashion_like_arrays(
    num_samples: int, *, split: str = "train", seed: int = 0, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``[start, start + num_samples)`` of a split as ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Args:
        num_samples: how many samples to return.
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share samples.
        seed: fixes the prototypes and every sample.
        start: index of the first sample.

    >>> images, labels = fashion_like_arrays(3, seed=1)
    >>> images.shape, images.dtype.name, labels.dtype.name
    ((3, 28, 28), 'uint8', 'int64')
    """
    if num_samples < 0 or start < 0:
        raise ValueError(f"`num_samples` and `start` must be >= 0, got num_samples={num_samples}, start={start}.")
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}. Expected one of: {', '.join(_SPLIT_IDS)}.")
    prototypes = _prototypes(seed)
    images = np.empty((num_samples, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    labels = np.empty(num_samples, dtype=np.int64)
    stop = start + num_samples
    for block in range(start // _BLOCK, -(-stop // _BLOCK)):
        block_images, block_labels = _block(seed, split, block, prototypes)
        lo, hi = max(start, block * _BLOCK), min(stop, (block + 1) * _BLOCK)
        images[lo - start : hi - start] = block_images[lo - block * _BLOCK : hi - block * _BLOCK]
        labels[lo - start : hi - start] = block_labels[lo - block * _BLOCK : hi - block * _BLOCK]
    return images, labels


def iter_fashion_like(num_samples: int, *, split: str = "train", seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield samples one at a time as ``{"image": uint8 [28, 28], "label": int64 scalar}``, a block at a time."""
    for block_start in range(0, num_samples, _BLOCK):
        images, labels = fashion_like_arrays(
            min(_BLOCK, num_samples - block_start), split=split, seed=seed, start=block_start
        )
        for image, label in zip(images, labels, strict=True):
            yield {"image": image, "label": label}


class FashionLikeSamples:
    """``num_samples`` samples of a split as a sized iterable, the way the shard writer takes them.

    Iterating yields what :func:`iter_fashion_like` yields, generating a block at a time, so a split is
    never held in memory whole.

    Args:
        num_samples: how many samples.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: fixes the prototypes and every sample.

    >>> samples = FashionLikeSamples(5, split="val", seed=1)
    >>> len(samples), [int(s["label"]) for s in samples] == fashion_like_arrays(5, split="val", seed=1)[1].tolist()
    (5, True)
    """

    def __init__(self, num_samples: int, *, split: str = "train", seed: int = 0) -> None:
        self.num_samples = num_samples
        self.split = split
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_fashion_like(self.num_samples, split=self.split, seed=self.seed)
