"""Per-shard label histograms, counted while the writer fills each shard, for the manifest's ``label_counts``.

A reader that balances classes per rank (``ClassBalance(min_per_class=k)``) needs to know which classes each
shard holds; recorded in the manifest, the histograms let it plan from the manifest alone instead of reading
every shard's label column. A *label field* is an integer scalar field (shape ``()``, dtype ``int*`` or
``uint*``) whose values are class indices ``0 .. C-1`` with ``C <=``
:data:`~lightning_patterns.data.shards.limits.MAX_LABEL_CLASSES`.

By default the field named ``label`` is counted when the schema has one of that kind; a value that is not a
class index (negative, or too large) then stops the recording of that field for the whole write (a label
field by name only, it may hold anything), with a log line. Fields named explicitly (``label_fields=[...]``)
must be label fields, and such a value is an error naming the sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_patterns.data.shards.limits import MAX_LABEL_CLASSES
from lightning_patterns.data.shards.schema import FieldSpec, Schema

__all__ = ["DEFAULT_LABEL_FIELD", "LabelCounter", "is_label_field"]

log = logging.getLogger(__name__)

DEFAULT_LABEL_FIELD = "label"


def is_label_field(spec: FieldSpec) -> bool:
    """Whether a field can hold class indices: an integer scalar (shape ``()``, a signed or unsigned int dtype)."""
    return spec.shape == () and np.dtype(spec.dtype).kind in "iu"


class LabelCounter:
    """Counts, per open shard (bucket), the samples of each class of the chosen label fields.

    Args:
        schema: the dataset's schema.
        label_fields: the fields to count; ``None`` counts ``"label"`` if the schema has an integer scalar field
            of that name, ``[]`` counts none.

    Raises:
        ValueError: a field of ``label_fields`` is not in the schema, or not an integer scalar; the message names it.
    """

    def __init__(self, schema: Schema, label_fields: Sequence[str] | None) -> None:
        self.explicit = label_fields is not None
        if label_fields is None:
            spec = schema.get(DEFAULT_LABEL_FIELD)
            label_fields = [DEFAULT_LABEL_FIELD] if spec is not None and is_label_field(spec) else []
        names = list(schema)
        for name in label_fields:
            if name not in schema:
                raise ValueError(
                    f"label_fields names {name!r}, which the samples do not have (their fields: {names}). Name the "
                    "field holding the class labels, or drop it from `label_fields`."
                )
            if not is_label_field(schema[name]):
                raise ValueError(
                    f"label_fields names {name!r}, a {schema[name].describe()} field; class counts are recorded for "
                    "integer scalar fields only (one class index per sample). Drop it from `label_fields`."
                )
        self.fields = list(dict.fromkeys(label_fields))
        self._positions = [names.index(name) for name in self.fields]
        # bucket -> one list of per-class counts per counted field
        self._open: dict[int, list[list[int]]] = {}

    def add(self, bucket: int, values: Sequence[Any], index: int) -> None:
        """Count sample ``index`` (its values as :meth:`Schema.normalize` returns them) into ``bucket``'s shard."""
        labels = [int(values[position]) for position in self._positions]
        for k in reversed(range(len(labels))):  # from the end, so dropping field k keeps the indices before it
            if not 0 <= labels[k] < MAX_LABEL_CLASSES:
                self._not_a_class(k, labels[k], index)
                del labels[k]
        if not labels:
            return
        counts = self._open.get(bucket)
        if counts is None:
            counts = self._open[bucket] = [[] for _ in self.fields]
        for histogram, label in zip(counts, labels, strict=True):
            if label >= len(histogram):
                histogram.extend([0] * (label + 1 - len(histogram)))
            histogram[label] += 1

    def _not_a_class(self, k: int, label: int, index: int) -> None:
        name = self.fields[k]
        if self.explicit:
            raise ValueError(
                f"Sample {index} has {name}={label}, which is not a class index 0 .. {MAX_LABEL_CLASSES - 1}; class "
                f"counts cannot be recorded for {name!r}. Map the labels to 0 .. num_classes - 1, or drop {name!r} "
                "from `label_fields`."
            )
        log.info("Not recording class counts of %r: sample %d holds %d, not a class index", name, index, label)
        del self.fields[k], self._positions[k]
        for counts in self._open.values():
            del counts[k]

    def pop(self, bucket: int) -> dict[str, tuple[int, ...]]:
        """The counts of ``bucket``'s shard, now written (and forget them: the bucket starts a new shard)."""
        counts = self._open.pop(bucket, None)
        if counts is None:
            return {}
        return {name: tuple(histogram) for name, histogram in zip(self.fields, counts, strict=True)}
