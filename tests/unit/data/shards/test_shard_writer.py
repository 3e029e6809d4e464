"""Unit tests of `write_dataset`: targets, modes, appending, atomic publish and bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from lightning_patterns.data.sharding import bucket_of
from lightning_patterns.data.shards import (
    MANIFEST_NAME,
    ShardWriter,
    load_manifest,
    read_shard,
    verify_dataset,
    write_dataset,
)
from lightning_patterns.exceptions import SchemaMismatchError

Samples = Callable[..., list[dict[str, Any]]]


def _read_all(url: str) -> list[dict[str, Any]]:
    manifest = load_manifest(url)
    out = []
    for shard in manifest.shards:
        reader = read_shard(url, shard, schema=manifest.schema)
        out.extend(reader.read(i) for i in range(reader.num_samples))
    return out


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.find(root)}


@pytest.mark.parametrize("kind", ["local", "file_url", "memory"])
def test_write_and_read_back(kind: str, tmp_path: Path, memory_url: str, mnist_like: Samples) -> None:
    url = {"local": str(tmp_path / "ds"), "file_url": f"file://{tmp_path}/ds", "memory": memory_url}[kind]
    samples = mnist_like(50)
    manifest = write_dataset(samples, url, shard_bytes=8_000, progress=False)
    assert manifest.num_samples == 50
    assert manifest == load_manifest(url)
    assert verify_dataset(url) == manifest
    back = _read_all(url)
    assert [int(s["label"]) for s in back] == [i % 10 for i in range(50)]
    assert all(torch.equal(b["image"], torch.from_numpy(s["image"])) for b, s in zip(back, samples, strict=True))
    for shard in manifest.shards:
        assert shard.path.endswith(".lps")
        assert shard.checksum.startswith("sha256:")


def test_map_style_dataset_and_generator_are_accepted(memory_url: str) -> None:
    class MapStyle:
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": torch.tensor([i, i])}

    def gen() -> Iterator[dict[str, Any]]:
        yield from ({"x": torch.tensor([i, i])} for i in range(5, 8))

    write_dataset(MapStyle(), memory_url, progress=False)
    write_dataset(gen(), memory_url, mode="append", progress=False)
    assert [s["x"][0].item() for s in _read_all(memory_url)] == list(range(8))


def test_progress_bar_is_shown_by_default(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset([{"x": 1}] * 3, memory_url)
    assert "3/3" in capsys.readouterr().err
    write_dataset([{"x": 1}] * 3, memory_url, mode="overwrite", progress=False)
    assert capsys.readouterr().err == ""


def test_create_refuses_an_existing_dataset(memory_url: str) -> None:
    write_dataset([{"x": 1}], memory_url, progress=False)
    before = _files(memory_url)
    with pytest.raises(FileExistsError, match=r"A dataset already exists at .*mode='append'.*mode='overwrite'"):
        write_dataset([{"x": 2}], memory_url, progress=False)
    assert _files(memory_url) == before


def test_append_keeps_existing_shards_byte_identical(tmp_path: Path, mnist_like: Samples) -> None:
    url = str(tmp_path / "ds")
    first = write_dataset(mnist_like(30), url, shard_bytes=8_000, progress=False)
    before = _files(url)
    second = write_dataset(mnist_like(25, seed=1), url, mode="append", progress=False)
    after = _files(url)
    for shard in first.shards:
        assert after[shard.path] == before[shard.path]
    assert second.shards[: len(first.shards)] == first.shards
    assert not {s.path for s in second.shards[len(first.shards) :]} & set(before)
    assert second.num_samples == 55
    assert second.generation == first.generation + 1
    assert second.sharding == first.sharding  # shard_bytes recorded by the first write is reused
    verify_dataset(url)


def test_append_to_hash_dataset_reuses_its_rule(memory_url: str) -> None:
    write_dataset(
        [{"k": i} for i in range(20)], memory_url, sharding="hash", num_shards=3, hash_key="k", progress=False
    )
    manifest = write_dataset([{"k": i} for i in range(20, 30)], memory_url, mode="append", progress=False)
    assert manifest.sharding == {"rule": "hash", "num_shards": 3, "key": "k", "hash": "blake2b-64"}
    for shard in manifest.shards:
        for k in read_shard(memory_url, shard).read_range(0, shard.num_samples)["k"].tolist():
            assert bucket_of(k, 3) == shard.bucket


def test_append_with_a_conflicting_rule_is_refused(memory_url: str) -> None:
    write_dataset([{"k": 1}], memory_url, sharding="hash", num_shards=3, progress=False)
    with pytest.raises(ValueError, match=r"Cannot append with num_shards=4 \(the dataset has num_shards=3\)"):
        write_dataset([{"k": 2}], memory_url, mode="append", num_shards=4, progress=False)
    with pytest.raises(ValueError, match=r"sharding='size' \(the dataset has sharding='hash'\)"):
        write_dataset([{"k": 2}], memory_url, mode="append", sharding="size", progress=False)


def test_append_with_another_schema_fails_and_publishes_nothing(memory_url: str) -> None:
    write_dataset([{"image": np.zeros((28, 28), np.uint8), "label": 1}], memory_url, progress=False)
    before = _files(memory_url)
    bad = [{"image": np.zeros((32, 32), np.uint8), "label": 1}]
    with pytest.raises(SchemaMismatchError) as info:
        write_dataset(bad, memory_url, mode="append", progress=False)
    message = str(info.value)
    assert "does not match the existing dataset" in message
    assert "Field 'image' is uint8[32, 32], but the dataset schema expects uint8[28, 28]" in message
    assert "convert the value" in message
    assert _files(memory_url) == before


def test_append_to_a_missing_dataset_creates_it(memory_url: str) -> None:
    manifest = write_dataset([{"x": 1}], memory_url, mode="append", progress=False)
    assert manifest.num_samples == 1
    assert manifest.generation == 1


def test_overwrite_replaces_the_dataset_and_retires_old_shards_for_the_grace_period(memory_url: str) -> None:
    old = write_dataset([{"x": 1}] * 4, memory_url, progress=False)
    new = write_dataset([{"y": "a"}], memory_url, mode="overwrite", progress=False)
    assert new.num_samples == 1
    assert list(new.schema) == ["y"]
    assert new.generation == 2
    # The old generation stays for readers of the old manifest, listed as retired, not as shards.
    assert [(g.generation, g.shards) for g in new.retired] == [(1, tuple(s.path for s in old.shards))]
    assert set(_files(memory_url)) == {MANIFEST_NAME} | {s.path for s in old.shards + new.shards}
    assert load_manifest(memory_url) == new


def test_overwrite_with_no_grace_period_removes_old_shards_at_once(memory_url: str) -> None:
    old = write_dataset([{"x": 1}] * 4, memory_url, progress=False)
    new = write_dataset([{"y": "a"}], memory_url, mode="overwrite", progress=False, grace_period=0)
    files = _files(memory_url)
    assert not {s.path for s in old.shards} & set(files)
    assert set(files) == {MANIFEST_NAME} | {s.path for s in new.shards}
    assert new.retired == ()


def test_exception_mid_write_leaves_previous_manifest_and_readers_untouched(memory_url: str) -> None:
    write_dataset([{"x": np.int64(i)} for i in range(10)], memory_url, shard_bytes=512, progress=False)
    before = _files(memory_url)

    def failing() -> Iterator[dict[str, Any]]:
        for i in range(1000):
            if i == 700:
                raise RuntimeError("source went away")
            yield {"x": np.int64(i)}

    with pytest.raises(RuntimeError, match="source went away"):
        write_dataset(failing(), memory_url, mode="append", progress=False)
    assert _files(memory_url) == before  # the shards it wrote (several) were removed, manifest untouched
    assert [int(s["x"]) for s in _read_all(memory_url)] == list(range(10))


def test_exception_in_shard_writer_block_publishes_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")

    def write_then_fail() -> None:
        with ShardWriter(url, shard_bytes=300) as writer:
            for i in range(100):
                writer.write({"x": np.int64(i)})
            assert len(list((tmp_path / "ds").iterdir())) > 3  # shards are written as buckets fill
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        write_then_fail()
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()
    assert list((tmp_path / "ds").iterdir()) == []


def test_local_publish_leaves_no_temporary_files(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    write_dataset([{"x": 1}], url, progress=False)
    write_dataset([{"x": 2}], url, mode="append", progress=False)
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert [n for n in names if not n.endswith(".lps")] == [MANIFEST_NAME]


@pytest.mark.parametrize("empty", [[], iter([]), ()])
def test_empty_dataset_is_refused_and_nothing_published(empty: Any, memory_url: str) -> None:
    with pytest.raises(ValueError, match=r"No samples to write to .*: the dataset is empty\. Pass a dataset"):
        write_dataset(empty, memory_url, progress=False)
    assert _files(memory_url) == {}


def test_sample_larger_than_the_target_gets_its_own_shard_with_a_warning(memory_url: str) -> None:
    samples = [{"b": b"x" * 10}, {"b": b"y" * 5000}, {"b": b"z" * 6000}, {"b": b"w" * 10}]
    with pytest.warns(UserWarning, match=r"Sample 1 needs a \d+-byte shard, more than shard_bytes=1000.*Increase"):
        manifest = write_dataset(samples, memory_url, shard_bytes=1000, progress=False)
    assert [s.num_samples for s in manifest.shards] == [1, 1, 1, 1]
    assert [s["b"][:1] for s in _read_all(memory_url)] == [b"x", b"y", b"z", b"w"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sharding": "round_robin"}, ValueError, r"Unknown sharding='round_robin'. Expected one of: .*hash.*size"),
        ({"sharding": "hash"}, ValueError, "needs `num_shards`"),
        ({"sharding": "hash", "num_shards": 0}, ValueError, "num_shards=0"),
        ({"shard_bytes": 0}, ValueError, r"`shard_bytes` must be a positive int .* shard_bytes=0"),
        ({"sharding": "size", "num_shards": 2}, ValueError, "only applies to sharding='hash'"),
        (
            {"mode": "replace"},
            ValueError,
            r"Unknown mode='replace'. Expected one of \('create', 'append', 'overwrite'\)",
        ),
        ({"label_fields": ["y"]}, ValueError, r"label_fields names 'y', which the samples do not have .*\['x'\]"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], error: type[Exception], match: str, memory_url: str) -> None:
    with pytest.raises(error, match=match):
        write_dataset([{"x": 1}], memory_url, progress=False, **kwargs)
    assert _files(memory_url) == {}


def test_http_is_read_only() -> None:
    with pytest.raises(ValueError, match="HTTP\\(S\\) is read-only"):
        write_dataset([{"x": 1}], "http://127.0.0.1:9/data", progress=False)


def test_a_single_sample_is_not_a_dataset(memory_url: str) -> None:
    with pytest.raises(TypeError, match=r"Wrap it in a list"):
        write_dataset({"x": 1}, memory_url, progress=False)


def test_write_speed_smoke(tmp_path: Path, mnist_like: Samples) -> None:
    # 20,000 MNIST-sized samples; the 200,000-sample benchmark is reported separately.
    manifest = write_dataset(mnist_like(20_000), str(tmp_path / "ds"), shard_bytes=4 * 2**20, progress=False)
    assert manifest.num_samples == 20_000
    assert len(manifest.shards) == 4


def test_writes_from_an_iterable_dataset(memory_url: str) -> None:
    from torch.utils.data import IterableDataset

    from lightning_patterns.data.shards import load_manifest

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(5):
                yield {"x": np.int64(i)}

    manifest = write_dataset(Stream(), memory_url, progress=False)
    assert manifest.num_samples == 5
    assert load_manifest(memory_url).num_samples == 5


def _labelled(labels: list[int], dtype: str = "int64") -> list[dict[str, Any]]:
    return [
        {"x": np.float32(i), "label": np.array(label, dtype=dtype)[()], "y": i % 3} for i, label in enumerate(labels)
    ]


def test_label_counts_are_recorded_per_shard(memory_url: str) -> None:
    labels = [i % 7 for i in range(200)]
    manifest = write_dataset(_labelled(labels), memory_url, num_shards=3, hash_key="label", progress=False)
    assert load_manifest(memory_url) == manifest
    for shard in manifest.shards:
        counts = shard.label_counts["label"]
        assert sum(counts) == shard.num_samples
        classes = {c for c in range(7) if bucket_of(c, 3) == shard.bucket}
        assert {c for c, n in enumerate(counts) if n} == classes  # the shard holds exactly its bucket's classes
    assert sum(
        np.pad(s.label_counts["label"], (0, 7 - len(s.label_counts["label"]))) for s in manifest.shards
    ).tolist() == [labels.count(c) for c in range(7)]
    # Unsigned labels and named fields; an append records its new shards, keeping the old ones as they were.
    more = write_dataset(_labelled([2] * 5, "int64"), memory_url, mode="append", progress=False, label_fields=["y"])
    assert more.shards[: len(manifest.shards)] == manifest.shards
    assert [s.label_counts for s in more.shards[len(manifest.shards) :]] == [{"y": (2, 2, 1)}]
    url = memory_url + "-u8"
    assert write_dataset(_labelled([1, 1, 4], "uint8"), url, progress=False).shards[0].label_counts == {
        "label": (0, 2, 0, 0, 1)
    }
    assert (
        write_dataset(_labelled([1], "int64"), url + "none", progress=False, label_fields=[]).shards[0].label_counts
        == {}
    )


def test_fields_that_are_not_class_labels_are_not_counted(memory_url: str) -> None:
    # By default: a 'label' that is not an integer scalar, or holds a value that is no class index, is skipped.
    floats = [{"label": np.float32(1.0)}] * 3
    assert write_dataset(floats, memory_url + "/f", progress=False).shards[0].label_counts == {}
    negative = _labelled([3, 1, 2] * 10 + [-1] + [2] * 5)  # sample 30: after the first shard was written
    manifest = write_dataset(negative, memory_url + "/n", shard_bytes=1024, progress=False)
    assert manifest.shards[0].num_samples < 30
    assert all(shard.label_counts == {} for shard in manifest.shards)  # not even the shards written before the -1
    # Named explicitly, such a field or value is an error naming it.
    with pytest.raises(ValueError, match=r"label_fields names 'x', a float32 field; class counts are recorded for"):
        write_dataset(negative, memory_url + "/x", progress=False, label_fields=["x"])
    with pytest.raises(ValueError, match=r"Sample 30 has label=-1, which is not a class index 0 \.\. 65535"):
        write_dataset(negative, memory_url + "/e", progress=False, label_fields=["label", "y"])
    assert not fsspec.filesystem("memory").exists(memory_url + "/e/" + MANIFEST_NAME)
