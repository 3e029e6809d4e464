"""Unit tests of the `.lps` shard format: round trips, random access, batches, corrupt buffers."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_patterns.data.shards import (
    MAGIC,
    FieldSpec,
    Schema,
    ShardBuilder,
    ShardFormatError,
    ShardReader,
    encode_shard,
)
from lightning_patterns.data.shards.reader import read_column
from lightning_patterns.exceptions import SchemaMismatchError

NUMERIC_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
]


def _samples(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    return [
        {
            "tensor": torch.arange(6, dtype=torch.float32).reshape(2, 3) + i,
            "image": rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8),
            "int": i,
            "float": i / 3,
            "flag": i % 2 == 0,
            "np_scalar": np.float32(i * 0.5),
            "bytes": bytes(range(i % 7)),
            "text": "héllo" * (i % 4),
        }
        for i in range(n)
    ]


def _assert_equal(got: Any, expected: Any) -> None:
    if isinstance(expected, (bytes, str)):
        assert got == expected
        assert type(got) is type(expected)
    else:
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, torch.as_tensor(np.asarray(expected)))


def test_round_trip_every_supported_type() -> None:
    samples = _samples(17)
    schema = Schema.infer(samples[0])
    assert schema["tensor"] == FieldSpec("float32", (2, 3))
    assert schema["image"] == FieldSpec("uint8", (4, 5, 3))
    assert schema["int"] == FieldSpec("int64", ())
    assert schema["float"] == FieldSpec("float64", ())
    assert schema["flag"] == FieldSpec("bool", ())
    assert schema["np_scalar"] == FieldSpec("float32", ())
    assert schema["bytes"] == FieldSpec("bytes", None)
    assert schema["text"] == FieldSpec("str", None)
    reader = ShardReader(encode_shard(samples, schema))
    assert reader.num_samples == len(reader) == 17
    assert reader.schema == schema
    for i in [16, 0, 5, 3]:  # random access, any order
        sample = reader.read(i)
        assert list(sample) == list(schema)
        for name, value in samples[i].items():
            _assert_equal(sample[name], value)
    assert reader.read(0)["int"].shape == ()
    assert reader.read(-1)["text"] == samples[-1]["text"]


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 1, 4)])
def test_numeric_dtypes_and_shapes_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    arrays = [(rng.random(shape) * 100).astype(dtype) for _ in range(5)]
    schema = Schema.infer({"x": arrays[0]})
    assert schema["x"] == FieldSpec(dtype, shape)
    reader = ShardReader(encode_shard([{"x": a} for a in arrays], schema))
    batch = reader.read_range(0, 5)["x"]
    assert batch.shape == (5, *shape)
    np.testing.assert_array_equal(batch.numpy(), np.stack(arrays))
    np.testing.assert_array_equal(reader.read(3)["x"].numpy(), arrays[3])


def test_read_range_and_read_batch_match_read() -> None:
    samples = _samples(23)
    reader = ShardReader(encode_shard(samples, Schema.infer(samples[0])))
    batch = reader.read_range(4, 11)
    indices = np.array([22, 0, 7, 7, -1, 3])
    gathered = reader.read_batch(indices)
    for name in reader.schema:
        for k, i in enumerate(range(4, 11)):
            _assert_equal(batch[name][k], reader.read(i)[name])
        for k, i in enumerate(indices):
            _assert_equal(gathered[name][k], reader.read(int(i))[name])
    assert batch["image"].shape == (7, 4, 5, 3)
    assert isinstance(batch["text"], list)
    assert reader.read_range(3, 3)["image"].shape == (0, 4, 5, 3)
    assert reader.read_batch(np.array([], dtype=np.int64))["int"].shape == (0,)


def test_read_range_shares_memory_with_a_writable_buffer_and_copies_a_read_only_one() -> None:
    samples = _samples(4)
    data = encode_shard(samples, Schema.infer(samples[0]))
    writable = bytearray(data)
    batch = ShardReader(writable).read_range(0, 4)["image"]
    batch[0, 0, 0, 0] = 255 - int(batch[0, 0, 0, 0])  # visible in the buffer: zero-copy
    assert ShardReader(writable).read(0)["image"][0, 0, 0] == batch[0, 0, 0, 0]
    read_only = ShardReader(data).read_range(0, 4)["image"]  # no "non-writable" warning (warnings are errors)
    read_only[0, 0, 0, 0] += 1  # a private copy: safe to modify
    assert ShardReader(data).read(0)["image"][0, 0, 0] != read_only[0, 0, 0, 0]


def test_reader_over_mmap(tmp_path: Path) -> None:
    samples = _samples(9)
    path = tmp_path / "x.lps"
    path.write_bytes(encode_shard(samples, Schema.infer(samples[0])))
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        reader = ShardReader(mapped)
        assert reader.read(8)["text"] == samples[8]["text"]
        assert torch.equal(reader.read_range(0, 9)["tensor"][2], samples[2]["tensor"])


def test_file_layout_is_columnar_and_aligned() -> None:
    samples = [{"a": np.full((2,), i, dtype="<i4"), "s": "x" * i} for i in range(3)]
    data = encode_shard(samples, Schema.infer(samples[0]))
    magic, header_len = struct.unpack_from("<8sQ", data)
    assert magic == MAGIC == b"LPSHRD01"
    import json

    header = json.loads(data[16 : 16 + header_len])
    assert header["num_samples"] == 3
    a, s = header["fields"]["a"], header["fields"]["s"]
    assert a["offset"] % 64 == 0
    assert a["index_offset"] is None
    assert data[a["offset"] : a["offset"] + a["nbytes"]] == np.repeat(np.arange(3, dtype="<i4"), 2).tobytes()
    index = np.frombuffer(data, dtype="<u8", count=4, offset=s["index_offset"])
    assert index.tolist() == [0, 0, 1, 3]
    assert data[s["offset"] : s["offset"] + s["nbytes"]] == b"xxx"


def test_builder_predicts_the_exact_file_size() -> None:
    schema = Schema.infer({"b": b"", "v": np.zeros(3, np.float32), "t": ""})
    builder = ShardBuilder(schema)
    for i in range(40):
        values = schema.normalize({"b": b"x" * i, "v": np.zeros(3, np.float32), "t": "é" * i})
        predicted = builder.file_size_with(values)
        builder.append(values)
        assert builder.file_size == predicted == len(builder.finish())


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"x": np.zeros((2, 2), np.float64), "y": 1}, r"Field 'x' is float64\[2, 2\], but the dataset schema expects"),
        ({"x": np.zeros((3,), np.float32), "y": 1}, r"Field 'x' is float32\[3\], but .* expects float32\[2, 2\]"),
        ({"x": np.zeros((2, 2), np.float32), "y": "1"}, r"Field 'y' is str, but .* expects int64"),
        ({"x": np.zeros((2, 2), np.float32)}, r"missing: \['y'\]"),
        ({"x": np.zeros((2, 2), np.float32), "y": 1, "z": 2}, r"unexpected: \['z'\]"),
    ],
)
def test_schema_mismatch_names_field_expected_and_got(second: dict[str, Any], match: str) -> None:
    first = {"x": np.zeros((2, 2), np.float32), "y": 1}
    schema = Schema.infer(first)
    with pytest.raises(SchemaMismatchError, match=match) as info:
        encode_shard([first, second], schema)
    assert "before writing" in str(info.value)


def test_python_scalars_are_weakly_typed() -> None:
    schema = Schema({"a": FieldSpec("int16", ()), "b": FieldSpec("float32", ()), "c": FieldSpec("bool", ())})
    reader = ShardReader(encode_shard([{"a": 3, "b": 0.5, "c": True}], schema))
    sample = reader.read(0)
    assert sample["a"].dtype == torch.int16
    assert sample["b"].item() == 0.5
    assert sample["c"].item() is True


def test_schema_json_round_trip() -> None:
    schema = Schema.infer(_samples(1)[0])
    assert Schema.from_json(schema.to_json()) == schema
    assert list(Schema.from_json(schema.to_json())) == list(schema)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.zeros(2, dtype=torch.bfloat16), "no numpy equivalent"),
        (np.array(["a"]), "unsupported type ndarray"),
        ([1, 2], "unsupported type list"),
        (None, "unsupported type NoneType"),
    ],
)
def test_unsupported_values_are_refused(value: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Schema.infer({"x": value})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:10], "truncated"),
        (lambda d: b"NOTSHARD" + d[8:], "magic"),
        (lambda d: d[:16] + b"[" + d[17:], "header is not valid JSON"),
        (lambda d: d[:-64], "truncated or corrupt"),
        (lambda d: d[:8] + struct.pack("<Q", 10**9) + d[16:], "header claims"),
    ],
)
def test_bad_buffers_raise_shard_format_error(mutate: Any, match: str) -> None:
    data = encode_shard([{"a": np.zeros(40, np.float64)}], Schema.infer({"a": np.zeros(40, np.float64)}))
    with pytest.raises(ShardFormatError, match=match):
        ShardReader(mutate(data))
    assert issubclass(ShardFormatError, ValueError)


def test_reader_checks_an_expected_schema_and_index_bounds() -> None:
    data = encode_shard([{"a": 1}], Schema.infer({"a": 1}))
    with pytest.raises(SchemaMismatchError, match="field 'a' is int64, expected float32"):
        ShardReader(data, Schema({"a": FieldSpec("float32", ())}))
    reader = ShardReader(data)
    with pytest.raises(IndexError, match="out of range"):
        reader.read(1)
    with pytest.raises(IndexError, match="invalid"):
        reader.read_range(0, 2)
    with pytest.raises(IndexError, match="Indices must lie"):
        reader.read_batch([5])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("str", (1,)), "variable-length"),
        (("int64", None), "tuple of non-negative ints"),
        (("object", ()), "Unsupported dtype 'object'"),
    ],
)
def test_field_spec_invalid_arguments(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FieldSpec(*args)


# ---------------------------------------------------------------- read_column: the reader's header checks, via ranges


def _ranges(data: bytes) -> tuple[Any, list[tuple[int, int]]]:
    asked: list[tuple[int, int]] = []

    def read_range(start: int, end: int) -> bytes:
        asked.append((start, end))
        return data[start:end]

    return read_range, asked


def test_read_column_reads_the_header_then_one_column() -> None:
    samples = [{"image": np.full((28, 28), i, np.uint8), "label": np.int64(i % 3), "name": f"s{i}"} for i in range(9)]
    schema = Schema.infer(samples[0])
    data = encode_shard(samples, schema)
    read_range, asked = _ranges(data)
    labels = read_column(read_range, "label", size=len(data), schema=schema)
    np.testing.assert_array_equal(labels, ShardReader(data).read_range(0, 9)["label"].numpy())
    label = ShardReader(data).header.columns["label"]
    # The prefix, the header, then the label column only: not the images.
    assert asked == [(0, 16), (16, asked[1][1]), (label.offset, label.offset + label.nbytes)]
    assert sum(end - start for start, end in asked) < len(data) // 4
    with pytest.raises(KeyError, match=r"no field 'missing'; its fields are \['image', 'label', 'name'\]"):
        read_column(read_range, "missing", size=len(data))
    with pytest.raises(ValueError, match="variable length"):
        read_column(read_range, "name", size=len(data))


def _with_header(data: bytes, edit: Any) -> bytes:
    """``data`` with its JSON header edited in place (padded back to the same length)."""
    import json

    (header_len,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + header_len])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len, b" ")
    assert len(text) == header_len
    return data[:16] + text + data[16 + header_len :]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: b"NOTSHARD" + d[8:], ShardFormatError, "magic"),
        (lambda d: d[:16] + b"[" + d[17:], ShardFormatError, "header is not valid JSON"),
        (lambda d: d[:8] + struct.pack("<Q", 10**9) + d[16:], ShardFormatError, "header claims"),
        (
            lambda d: _with_header(d, lambda h: h["fields"]["a"].update(nbytes=8)),
            ShardFormatError,
            r"'fields\['a'\]\.nbytes' is 8, but 5 samples of int64\[3\] \(24 bytes each\) take 120",
        ),
        (lambda d: _with_header(d, lambda h: h["fields"]["a"].update(offset=10**6)), ShardFormatError, "spans bytes"),
        (lambda d: _with_header(d, lambda h: h["fields"]["a"].update(dtype="float32")), SchemaMismatchError, "'a'"),
    ],
)
def test_read_column_and_shard_reader_make_the_same_header_checks(mutate: Any, error: type, match: str) -> None:
    schema = Schema.infer({"a": np.zeros(3, np.int64)})
    bad = mutate(encode_shard([{"a": np.full(3, i, np.int64)} for i in range(5)], schema))
    with pytest.raises(error, match=match):
        ShardReader(bad, schema)
    with pytest.raises(error, match=match):
        read_column(_ranges(bad)[0], "a", size=len(bad), schema=schema)


def test_read_column_checks_the_column_against_the_file_size() -> None:
    data = encode_shard([{"a": np.zeros(40, np.float64)}], Schema.infer({"a": np.zeros(40, np.float64)}))
    with pytest.raises(ShardFormatError, match="truncated or corrupt: the column of 'a' spans bytes"):
        read_column(_ranges(data)[0], "a", size=len(data) - 64)
    with pytest.raises(ShardFormatError, match="even the fixed prefix needs 16"):
        read_column(_ranges(data)[0], "a", size=10)
