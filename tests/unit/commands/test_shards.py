"""``lightning-patterns shards write|inspect``, called through ``run_shards_command``."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns._units import parse_size
from lightning_patterns.commands.shards import _option_arg, _storage_options, run_shards_command
from lightning_patterns.data.sharding import bucket_of
from lightning_patterns.data.shards import load_manifest, read_shard
from lightning_patterns.data.synthetic import fashion_like_arrays


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run_shards_command(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_back(url: str) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """All images and labels in manifest order, and each sample's shard bucket."""
    manifest = load_manifest(url)
    images, labels, buckets = [], [], []
    for shard in manifest.shards:
        reader = read_shard(url, shard, schema=manifest.schema)
        batch = reader.read_range(0, shard.num_samples)
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
        buckets += [shard.bucket] * shard.num_samples
    return np.concatenate(images), np.concatenate(labels), buckets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("32MiB", 32 * 2**20),
        ("64MB", 64_000_000),
        ("64mb", 64_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("2k", 2000),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12XB", "-5", "0", "0.1B", "1e6"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte"):
        parse_size(text)


def test_storage_options_are_typed_and_nested() -> None:
    pairs = [
        _option_arg("anon=true"),
        _option_arg("client_kwargs.endpoint_url=http://127.0.0.1:9000"),
        _option_arg("client_kwargs.region_name=us-east-1"),
        _option_arg("block_size=1024"),
    ]
    assert _storage_options(pairs) == {
        "anon": True,
        "block_size": 1024,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"},
    }


def test_write_synthetic_size_sharding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    code, out, _ = run(capsys, "write", "synthetic:300", dest, "--shard-bytes", "64KiB", "--no-progress")
    assert code == 0
    manifest = load_manifest(dest)
    assert manifest.sharding == {"rule": "size", "shard_bytes": 65536}
    assert manifest.num_samples == 300
    assert len(manifest.shards) > 1
    assert f"shards:   {len(manifest.shards)}\n" in out
    assert "samples:  300\n" in out
    assert f"bytes:    {manifest.num_bytes} " in out
    assert re.search(r"seconds:  \d+\.\d\d\n", out)
    images, labels, _ = read_back(dest)
    expected_images, expected_labels = fashion_like_arrays(300)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_write_synthetic_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    assert run(capsys, "write", "synthetic:40:val", dest, "--no-progress")[0] == 0
    _, labels, _ = read_back(dest)
    np.testing.assert_array_equal(labels, fashion_like_arrays(40, split="val")[1])


def test_write_hash_by_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    argv = ("write", "synthetic:300", dest, "--num-shards", "4", "--hash-key", "label", "--no-progress")
    code, out, _ = run(capsys, *argv)
    assert code == 0
    manifest = load_manifest(dest)
    assert manifest.sharding["rule"] == "hash"
    assert (manifest.sharding["num_shards"], manifest.sharding["key"]) == (4, "label")
    assert "sharding: hash (num_shards=4, key='label'" in out
    _, labels, buckets = read_back(dest)
    assert Counter(labels.tolist()) == Counter(fashion_like_arrays(300)[1].tolist())
    assert all(bucket_of(label, 4) == bucket for label, bucket in zip(labels.tolist(), buckets, strict=True))


def test_write_hash_by_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    assert run(capsys, "write", "synthetic:100", dest, "--num-shards", "3", "--no-progress")[0] == 0
    manifest = load_manifest(dest)
    assert manifest.sharding["key"] is None
    assert {s.bucket for s in manifest.shards} == {0, 1, 2}
    assert manifest.num_samples == 100


def test_reshard_existing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, by_size, by_hash = (str(tmp_path / name) for name in ("src", "by_size", "by_hash"))
    assert run(capsys, "write", "synthetic:200", src, "--shard-bytes", "1MiB", "--no-progress")[0] == 0
    assert len(load_manifest(src).shards) == 1
    code, out, _ = run(capsys, "write", src, by_size, "--shard-bytes", "20KiB", "--no-progress")
    assert code == 0
    assert f"wrote {src} to {by_size}" in out
    assert len(load_manifest(by_size).shards) > 5
    src_images, src_labels, _ = read_back(src)
    images, labels, _ = read_back(by_size)  # sequential re-sharding keeps the order
    np.testing.assert_array_equal(images, src_images)
    np.testing.assert_array_equal(labels, src_labels)

    assert run(capsys, "write", by_size, by_hash, "--num-shards", "5", "--hash-key", "label", "--no-progress")[0] == 0
    images, labels, _ = read_back(by_hash)
    assert Counter(labels.tolist()) == Counter(src_labels.tolist())
    assert sorted(i.tobytes() for i in images) == sorted(i.tobytes() for i in src_images)


def test_append_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    assert run(capsys, "write", "synthetic:60", dest, "--num-shards", "2", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "write", "synthetic:30:test", dest, "--mode", "append", "--no-progress")
    assert code == 0
    assert "samples:  90\n" in out
    assert load_manifest(dest).sharding["num_shards"] == 2  # the recorded rule is reused
    code, out, _ = run(capsys, "write", "synthetic:10", dest, "--mode", "overwrite", "--no-progress")
    assert code == 0
    assert load_manifest(dest).num_samples == 10


def test_options_may_sit_between_src_and_dest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    assert run(capsys, "write", "synthetic:5", "--no-progress", dest, "--shard-bytes", "1MB")[0] == 0
    assert load_manifest(dest).num_samples == 5


def test_write_to_memory_url_with_storage_option(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("write", "synthetic:20", memory_url, "--storage-option", "skip_instance_cache=false", "--no-progress")
    assert run(capsys, *argv)[0] == 0
    assert load_manifest(memory_url).num_samples == 20


def test_oversized_sample_is_a_warning_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    code, _, err = run(capsys, "write", "synthetic:3", dest, "--shard-bytes", "100", "--no-progress")
    assert code == 0
    assert "lightning-patterns shards write: warning: Sample 0 needs a" in err
    assert len(load_manifest(dest).shards) == 3


@pytest.fixture
def uneven(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """1000 samples hashed by index into 7 shards of unequal sizes."""
    url = str(tmp_path / "uneven")
    assert run(capsys, "write", "synthetic:1000", url, "--num-shards", "7", "--no-progress")[0] == 0
    sizes = [s.num_samples for s in load_manifest(url).shards]
    assert len(sizes) == 7
    assert len(set(sizes)) > 1
    return url


def test_inspect_prints_balance_and_equal_ranks(uneven: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", uneven, "--world-size", "3", "--num-workers", "2")
    assert (code, err) == (0, "")
    manifest = load_manifest(uneven)
    sizes = [s.num_samples for s in manifest.shards]
    assert "sharding: hash (num_shards=7, key=None" in out
    for i, shard in enumerate(manifest.shards):
        assert re.search(
            rf"^\s+{i}\s+{shard.num_samples}\s+{shard.num_bytes}\s+{shard.bucket}\s+{shard.path}$", out, re.M
        )
    ratio = max(sizes) / (sum(sizes) / len(sizes))
    assert (
        f"min {min(sizes)}, max {max(sizes)}, mean {sum(sizes) / 7:.1f}, imbalance ratio (max/mean) {ratio:.3f}" in out
    )
    ranks = re.findall(r"^rank (\d+): (\d+) samples, (\d+) batches$", out, re.M)
    assert ranks == [("0", "334", "334"), ("1", "334", "334"), ("2", "334", "334")]
    workers = re.findall(r"^  worker (\d): (\d+) samples, (\d+) batches, (\d+) shards opened, (\d+) spans", out, re.M)
    assert [w[0] for w in workers] == ["0", "1"] * 3
    assert sum(int(w[1]) for w in workers) == 1002
    assert "check: every rank gets the same number of samples: OK (334 samples, 334 batches per rank; " in out
    assert "2 padding repeats" in out


def test_inspect_batches_and_drop_last(uneven: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("inspect", uneven, "--world-size", "3", "--num-workers", "2", "--batch-size", "32", "--drop-last")
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert re.findall(r"^rank \d+: (\d+) samples, (\d+) batches$", out, re.M) == [("333", "11")] * 3
    assert "1 samples dropped" in out
    code, out, _ = run(capsys, "inspect", uneven, "--shuffle", "--epoch", "3", "--seed", "7", "--num-workers", "3")
    assert code == 0
    assert "plan: epoch 3, seed 7, shuffle on" in out
    assert "rank 0: 1000 samples" in out


def test_inspect_plot_writes_png(uneven: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    code, out, _ = run(capsys, "inspect", uneven, "--world-size", "4", "--num-workers", "3", "--plot", str(png))
    assert code == 0
    assert f"plot: {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # two panels with bars, axes and text, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 200


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "write", "--help")
    assert code == 0
    assert "synthetic:N[:SPLIT]" in out
    assert "--idx-images URL --idx-labels URL" in out
    assert run(capsys, "--help")[0] == 0


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([], 2, "the following arguments are required: {write,inspect,check,gc}"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["write"], 2, "the following arguments are required: DEST"),
        (["write", "{dest}"], 2, "the following arguments are required: SRC (a dataset URL or synthetic:N)"),
        (["write", "synthetic:5", "{dest}", "--shard-bytes", "1MiB", "--num-shards", "3"], 2, "are alternatives"),
        (["write", "synthetic:5", "{dest}", "--hash-key", "label"], 2, "add --num-shards S"),
        (["write", "synthetic:5", "{dest}", "--shard-bytes", "12XB"], 2, "argument --shard-bytes: Expected a byte"),
        (["write", "synthetic:5", "{dest}", "--num-shards", "0"], 2, "argument --num-shards: expected an integer >= 1"),
        (["write", "synthetic:5", "{dest}", "--mode", "replace"], 2, "argument --mode: invalid choice: 'replace'"),
        (["write", "synthetic:5", "{dest}", "--storage-option", "anon"], 2, "expected KEY=VALUE, got 'anon'"),
        (["write", "synthetic:0", "{dest}"], 2, "expected synthetic:N or synthetic:N:SPLIT with N >= 1"),
        (["write", "synthetic:5:dev", "{dest}"], 2, "unknown split 'dev'"),
        (["write", "--idx-images", "a", "{dest}"], 2, "--idx-labels is missing"),
        (["write", "x", "{dest}", "--idx-images", "a", "--idx-labels", "b"], 2, "got both SRC 'x' and --idx-images"),
        (
            ["write", "{missing}", "{dest}"],
            1,
            "SRC '{missing}' is not a lightning_patterns dataset: No dataset manifest",
        ),
        (["write", "synthetic:5", "{dest}", "--num-shards", "2", "--hash-key", "id"], 1, "'id'"),
        (["inspect"], 2, "the following arguments are required: URL"),
        (["inspect", "{missing}"], 1, "No dataset manifest at '{missing}/manifest.json'"),
        (["inspect", "{missing}", "--world-size", "0"], 2, "argument --world-size: expected an integer >= 1, got 0"),
        (["inspect", "{missing}", "--num-workers", "-1"], 2, "argument --num-workers: expected an integer >= 0"),
        (["gc"], 2, "the following arguments are required: URL"),
        (["gc", "{missing}", "--grace-period", "-1"], 2, "argument --grace-period: expected a duration >= 0"),
        (
            ["gc", "{missing}", "--grace-period", "1w"],
            2,
            "with a unit s, m, h or d (e.g. 0, 3600, 30m, 24h, 7d); got '1w'",
        ),
        (["gc", "{missing}", "--dry-run"], 2, "unrecognized arguments: --dry-run"),
        (
            ["write", "synthetic:5", "{dest}", "--label-field", "image"],
            1,
            "label_fields names 'image', a uint8[28, 28] field; class counts are recorded for integer scalar fields",
        ),
        (["write", "synthetic:5", "{dest}", "--label-field", "y"], 1, "label_fields names 'y', which the samples do"),
    ],
)
def test_errors(argv: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fill(text: str) -> str:
        return text.replace("{dest}", str(tmp_path / "dest")).replace("{missing}", str(tmp_path / "missing"))

    got, out, err = run(capsys, *map(fill, argv))
    assert got == code
    assert fill(message) in err
    assert out == ""
    assert "usage:" not in err  # only the offending argument, never the whole usage
    assert err.count("error:") == 1
    assert not (tmp_path / "dest" / "manifest.json").exists()


def _not_datasets(tmp_path: Path) -> dict[str, Path]:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"not a dataset")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "some other tool\'s manifest", "files": []}')
    return {"is a file": plain, "not a lightning_patterns manifest": other}


def test_inspect_of_what_is_not_a_dataset_is_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in _not_datasets(tmp_path).values():
        code, out, err = run(capsys, "inspect", str(path))
        assert (code, out) == (1, "")
        assert err.startswith("lightning-patterns shards inspect: error: ")
        assert len(err.splitlines()) == 1
        assert str(path) in err


def test_inspect_says_what_the_path_is_instead(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for substance, path in _not_datasets(tmp_path).items():
        code, _, err = run(capsys, "inspect", str(path))
        assert code == 1
        assert substance in err, err
        assert "Upgrade lightning_patterns" not in err


def test_existing_dest_points_to_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    assert run(capsys, "write", "synthetic:5", dest, "--no-progress")[0] == 0
    code, out, err = run(capsys, "write", "synthetic:5", dest, "--no-progress")
    assert (code, out) == (1, "")
    assert "A dataset already exists at" in err
    assert "--mode append or --mode overwrite" in err
    assert load_manifest(dest).num_samples == 5


def test_write_records_label_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "ds")
    code, out, _ = run(
        capsys, "write", "synthetic:300", dest, "--num-shards", "4", "--hash-key", "label", "--no-progress"
    )
    assert code == 0
    assert "label counts: recorded for label" in out
    _, labels, buckets = read_back(dest)
    for shard in load_manifest(dest).shards:
        mine = labels[np.asarray(buckets) == shard.bucket]
        assert shard.label_counts["label"] == tuple(np.bincount(mine).tolist())
    none = str(tmp_path / "none")
    assert run(capsys, "write", "synthetic:30", none, "--label-field", "label", "--no-progress")[0] == 0
    assert all(shard.label_counts for shard in load_manifest(none).shards)


def test_gc_lists_and_removes_an_overwritten_generation(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "write", "synthetic:40", memory_url, "--shard-bytes", "8KiB", "--no-progress")[0] == 0
    old = {shard.path for shard in load_manifest(memory_url).shards}
    argv = ["write", "synthetic:10", memory_url, "--mode", "overwrite", "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    new = load_manifest(memory_url)

    code, out, err = run(capsys, "gc", memory_url)
    assert (code, err) == (0, "")
    assert f"kept (inside the grace period): {len(old)} files" in out
    assert "grace period: 86400 s" in out

    code, out, _ = run(capsys, "gc", memory_url, "--grace-period", "0")
    expired = {line.strip() for line in out.split("expired")[1].split("kept")[0].splitlines()[1:]}
    assert (code, expired) == (0, old)
    assert f"dry run: nothing removed; run again with --apply to remove these {len(old)} files" in out

    code, out, _ = run(capsys, "gc", memory_url, "--grace-period", "0", "--apply")
    assert (code, f"removed: {len(old)} files" in out) == (0, True)
    assert load_manifest(memory_url) == new  # gc never rewrites the manifest
    assert run(capsys, "inspect", memory_url)[0] == 0
