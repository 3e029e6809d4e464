"""Write and read shards through s3fs against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from botocore.exceptions import EndpointConnectionError

from lightning_patterns.data.shards import (
    MANIFEST_NAME,
    load_manifest,
    read_shard,
    verify_dataset,
    write_dataset,
)
from lightning_patterns.testing import MotoS3Server, moto_s3_server

pytestmark = pytest.mark.remote


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    with moto_s3_server() as server:
        yield server


def _samples(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (28, 28), dtype=np.uint8), "label": i % 10, "id": f"sample-{i}"}
        for i in range(n)
    ]


def test_write_read_append_through_s3(s3: MotoS3Server) -> None:
    root = s3.create_bucket("datasets") + "/mnist"
    options = s3.storage_options
    manifest = write_dataset(_samples(40), root, shard_bytes=10_000, storage_options=options, progress=False)
    assert len(manifest.shards) > 1
    fs = s3.filesystem()
    assert fs.exists(f"datasets/mnist/{MANIFEST_NAME}")
    assert load_manifest(root, options) == manifest
    assert verify_dataset(root, options) == manifest

    appended = write_dataset(_samples(10), root, mode="append", storage_options=options, progress=False)
    assert appended.num_samples == 50
    labels, ids = [], []
    for shard in appended.shards:
        reader = read_shard(root, shard, storage_options=options, schema=appended.schema)
        batch = reader.read_range(0, reader.num_samples)
        labels += batch["label"].tolist()
        ids += batch["id"]
    assert labels == [i % 10 for i in range(40)] + [i % 10 for i in range(10)]
    assert ids[39] == "sample-39"
    first = read_shard(root, appended.shards[0], storage_options=options).read(0)
    assert torch.equal(first["image"], torch.from_numpy(_samples(1)[0]["image"]))


def test_hash_sharding_through_s3(s3: MotoS3Server) -> None:
    root = s3.create_bucket("hashed") + "/users"
    samples = [{"user": f"u{i % 7}", "x": np.float32(i)} for i in range(70)]
    manifest = write_dataset(
        samples,
        root,
        sharding="hash",
        num_shards=3,
        hash_key="user",
        storage_options=s3.storage_options,
        progress=False,
    )
    assert {s.bucket for s in manifest.shards} <= {0, 1, 2}
    assert verify_dataset(root, s3.storage_options).num_samples == 70


def test_storage_options_endpoint_is_honoured(s3: MotoS3Server) -> None:
    root = s3.create_bucket("endpoint") + "/ds"
    write_dataset([{"x": 1}], root, storage_options=s3.storage_options, progress=False)
    # The same bucket through another endpoint (nothing listens there) must not silently succeed.
    wrong = {**s3.storage_options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": s3.region}}
    wrong["config_kwargs"] = {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}
    wrong["skip_instance_cache"] = True
    with pytest.raises((OSError, EndpointConnectionError)):
        load_manifest(root, wrong)
    assert load_manifest(root, s3.storage_options).num_samples == 1


def test_server_repr_hides_credentials(s3: MotoS3Server) -> None:
    text = repr(s3)
    assert s3.endpoint_url in text
    assert s3.storage_options["secret"] not in text
