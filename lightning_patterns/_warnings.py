"""Warnings from the layers below that are noise for our users, silenced once, by exact message."""

from __future__ import annotations

import warnings

__all__ = ["silence_known_noise"]


def silence_known_noise() -> None:
    """Silence warnings that do not apply to lightning_patterns' loaders.

    - Lightning warns that an IterableDataset's ``__len__`` may be wrong with several workers; ours is exact
      per rank whatever the number of workers (every rank and worker plans its share).
    - torchdata 0.11 calls ``torch.set_vital``, which torch 2.13 deprecates: not our users' to fix.
    """
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")
