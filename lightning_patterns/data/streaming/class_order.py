"""Per-shard label histograms for the plan, and the map from a shard's class order to its file order.

A class-balanced plan may read shards in *class order* (``WorkerPlan.class_sorted``, see
:mod:`~lightning_patterns.data.sharding.class_stream`): local position ``i`` of shard ``s`` then means the
``i``-th sample of ``s`` once its samples are sorted stably by label. :class:`ClassOrder` turns such positions
into file positions, from the label column of the shard in hand, and checks that column against the
histogram the plan was made from: a manifest whose ``label_counts`` disagree with its shards fails with a
:class:`~lightning_patterns.data.shards.reader.ShardFormatError` naming the shard, never with wrong classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.shards.manifest import Manifest
from lightning_patterns.data.shards.reader import ShardFormatError, ShardReader

__all__ = ["ClassOrder", "recorded_histograms"]

_IntArray = npt.NDArray[np.int64]


def recorded_histograms(manifest: Manifest, label_field: str) -> list[tuple[int, ...] | None]:
    """Each shard's histogram of ``label_field`` as the manifest records it (``None`` where it records none)."""
    return [shard.label_counts.get(label_field) for shard in manifest.shards]


class ClassOrder:
    """Maps class-order positions to file positions, per shard in use.

    Args:
        label_field: the field with the class labels.
        histograms: ``hist[s, c]``, the histograms the plan was made from.
        describe: a shard's URL, for error messages.
    """

    def __init__(self, label_field: str, histograms: Sequence[Sequence[int]], describe: Callable[[int], str]) -> None:
        self.label_field = label_field
        self._histograms = histograms
        self._describe = describe
        self._orders: dict[int, _IntArray] = {}

    def file_positions(self, get: Callable[[int], ShardReader], shards: _IntArray, local: _IntArray) -> _IntArray:
        """The file positions of class-order positions ``local`` of ``shards`` (parallel arrays)."""
        out = np.empty_like(local)
        for shard in np.unique(shards).tolist():
            mask = shards == shard
            out[mask] = self._order(shard, get(shard))[local[mask]]
        return out

    def forget(self, shard: int) -> None:
        """Drop the order of a shard no longer in use."""
        self._orders.pop(shard, None)

    def _order(self, shard: int, reader: ShardReader) -> _IntArray:
        order = self._orders.get(shard)
        if order is None:
            labels = reader.read_field(self.label_field, np.arange(reader.num_samples)).reshape(-1).astype(np.int64)
            expected = np.asarray(self._histograms[shard], dtype=np.int64)
            found = np.bincount(labels[labels >= 0], minlength=expected.size) if labels.size else expected * 0
            if (labels < 0).any() or found.size != expected.size or not np.array_equal(found, expected):
                raise ShardFormatError(
                    f"Shard {self._describe(shard)} holds {self.label_field!r} class counts "
                    f"{found.tolist() if not (labels < 0).any() else 'with negative labels'}, but the plan was made "
                    f"from {expected.tolist()} (the manifest's label_counts, or the labels read at construction). The "
                    "dataset changed or its manifest is wrong: rewrite it, or reconstruct the dataset."
                )
            order = self._orders[shard] = np.argsort(labels, kind="stable").astype(np.int64)
        return order
