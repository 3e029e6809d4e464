"""The strategies refuse impossible bounds when called (not when drawn), each with a message naming the argument."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_patterns.data.shards import FieldSpec, Schema
from lightning_patterns.testing import JobTopology
from lightning_patterns.testing import strategies as lps


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: lps.uniform_shard_sizes(min_shards=0), r"Expected min_shards >= 1, got min_shards=0"),
        (lambda: lps.skewed_shard_sizes(max_shards=0), r"Cannot have max_shards=0 < min_shards=1"),
        (lambda: lps.one_giant_shard(min_samples=-1), r"Expected min_samples >= 0, got min_samples=-1"),
        (lambda: lps.shard_sizes_with_empties(min_shards=1), r"Expected min_shards >= 2, got min_shards=1"),
        (lambda: lps.shard_sizes(max_samples=0), r"Cannot have max_samples=0 < min_samples=1"),
        (lambda: lps.label_histograms([3], 0), r"Expected num_classes >= 1, got num_classes=0"),
        (lambda: lps.label_histograms([3], 2, "zigzag"), r"Unknown label layout 'zigzag'; expected 'mixed'"),
        (
            lambda: lps.manifests(num_classes=3, schema=Schema({"x": FieldSpec("int64", ())})),
            r"manifests\(label_field='label'\) names no field of the schema \['x'\]",
        ),
        (lambda: lps.topologies(max_world_size=0), r"Cannot have max_world_size=0 < min_world_size=1"),
        (lambda: lps.topologies(min_workers=-1), r"Expected min_workers >= 0, got min_workers=-1"),
        (lambda: lps.topologies(max_batch_size=0), r"Cannot have max_batch_size=0 < min_batch_size=1"),
        (lambda: lps.topologies(max_num_nodes=0), r"Expected max_num_nodes >= 1 or None, got max_num_nodes=0"),
        (lambda: lps.resume_points(JobTopology(), max_workers=-1), r"Cannot have max_workers=-1 < min_workers=0"),
        (
            lambda: lps.samples(Schema({"x": FieldSpec("int64", ())}), num_classes={"y": 3}),
            r"samples\(num_classes=\.\.\.\) names fields \['y'\] that the schema \['x'\] lacks",
        ),
        (
            lambda: lps.samples(Schema({"x": FieldSpec("float32", ())}), num_classes={"x": 3}),
            r"names a field of dtype 'float32'; class labels need an integer dtype",
        ),
    ],
)
def test_invalid_bounds_are_explained(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
