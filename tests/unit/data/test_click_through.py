"""The synthetic click-through data: a known model, Zipf popularity, deterministic blocks, shards that stream back."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jsonargparse
import numpy as np
import pytest
import torch
import yaml

from lightning_patterns.data.click_through import ClickThroughModel, ClickThroughSamples, click_through_arrays
from lightning_patterns.data.datamodule import ShardedStreamingDataModule
from lightning_patterns.data.embedded import EmbeddedClickThrough, EmbeddedFashionMNIST, prepare_embedded_dataset
from lightning_patterns.data.shards import ShardReader, load_manifest, write_dataset
from lightning_patterns.metrics import binary_auc
from lightning_patterns.recipes import find_recipe

MODEL = ClickThroughModel(num_users=200, num_items=5_000, seed=3)


def test_fields_and_the_generating_probability() -> None:
    arrays = click_through_arrays(MODEL, 20_000, split="val")
    assert {name: (a.dtype.name, a.shape) for name, a in arrays.items()} == {
        "ids": ("int64", (20_000, 2)),
        "dense": ("float32", (20_000, 4)),
        "label": ("int64", (20_000,)),
        "probability": ("float32", (20_000,)),
    }
    users, items = arrays["ids"][:, 0], arrays["ids"][:, 1]
    assert users.max() < 200
    assert items.max() < 5_000
    assert arrays["ids"].min() >= 0
    expected = MODEL.probability(users, items, arrays["dense"]).astype(np.float32)
    assert np.array_equal(arrays["probability"], expected)
    # Labels are Bernoulli draws of that probability: the click rate matches its mean, and it ranks them well.
    assert abs(arrays["label"].mean() - arrays["probability"].mean()) < 0.015
    auc = binary_auc(torch.from_numpy(arrays["probability"]), torch.from_numpy(arrays["label"])).item()
    assert 0.7 < auc < 0.95


def test_popularity_follows_a_power_law() -> None:
    """Id k has the probability of [k + 1, k + 2) under the density x ** -1.05 on [1, N + 1)."""
    num_items, exponent = 100_000, 1.05
    items = click_through_arrays(ClickThroughModel(num_items=num_items, item_exponent=exponent), 400_000)["ids"][:, 1]
    frequency = np.bincount(items, minlength=num_items) / len(items)
    edges = np.arange(1, 12, dtype=np.float64) ** (1 - exponent)
    expected = (edges[:-1] - edges[1:]) / (1 - (num_items + 1.0) ** (1 - exponent))
    np.testing.assert_allclose(frequency[:10], expected, rtol=0.1)
    assert frequency[:100].sum() > frequency[50_000:].sum()


def test_samples_are_deterministic_by_range_and_splits_differ() -> None:
    whole = click_through_arrays(MODEL, 20_000)
    part = click_through_arrays(MODEL, 5_000, start=9_000)
    for name in whole:
        assert np.array_equal(part[name], whole[name][9_000:14_000])
    assert not np.array_equal(click_through_arrays(MODEL, 100, split="val")["ids"], whole["ids"][:100])
    assert click_through_arrays(MODEL, 0)["ids"].shape == (0, 2)


def test_per_id_parameters_do_not_depend_on_the_table_size() -> None:
    """The 10M-item setting keeps every item's parameters: scaling the table only adds rarer items."""
    large = ClickThroughModel(num_users=200, num_items=10_000_000, seed=3)
    ids = np.array([0, 17, 4_999])
    assert np.array_equal(large.item_factors(ids), MODEL.item_factors(ids))
    dense = np.zeros((3, 4), dtype=np.float32)
    assert np.array_equal(large.probability(ids % 200, ids, dense), MODEL.probability(ids % 200, ids, dense))


def test_samples_write_as_shards_and_read_back(tmp_path: Path) -> None:
    url = str(tmp_path / "train")
    write_dataset(ClickThroughSamples(MODEL, 9_000), url, shard_bytes=100_000, progress=False)
    manifest = load_manifest(url)
    assert manifest.num_samples == 9_000
    assert len(manifest.shards) > 1
    parts = [
        ShardReader((Path(url) / shard.path).read_bytes(), manifest.schema).read_range(0, shard.num_samples)
        for shard in manifest.shards
    ]
    expected = click_through_arrays(MODEL, 9_000)
    for name, values in expected.items():
        assert np.array_equal(np.concatenate([np.asarray(part[name]) for part in parts]), values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_items": 0}, "ClickThroughModel needs `num_items` >= 1, got num_items=0"),
        ({"item_exponent": 0.0}, "ClickThroughModel needs a positive Zipf exponent, got item_exponent=0.0"),
        ({"factor_scale": -1.0}, "ClickThroughModel needs `factor_scale` >= 0"),
    ],
)
def test_invalid_model_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ClickThroughModel(**kwargs)
    with pytest.raises(ValueError, match=re.escape("Unknown split 'dev'")):
        click_through_arrays(MODEL, 1, split="dev")


def test_embedded_click_through_writes_both_splits_once(tmp_path: Path) -> None:
    source = EmbeddedClickThrough(train_samples=3_000, val_samples=500, num_items=1_000, data_dir=str(tmp_path))
    root = prepare_embedded_dataset(source, progress=False)
    assert load_manifest(str(root / "train")).num_samples == 3_000
    assert load_manifest(str(root / "val")).num_samples == 500
    written = (root / "train" / "manifest.json").stat().st_mtime_ns
    prepare_embedded_dataset(source, progress=False)
    assert (root / "train" / "manifest.json").stat().st_mtime_ns == written
    # The default folder is named after every setting, so other settings never reuse these shards.
    assert EmbeddedClickThrough(num_items=1_000).root != EmbeddedClickThrough(num_items=1_001).root
    with pytest.raises(ValueError, match=re.escape("needs at least one sample per split")):
        EmbeddedClickThrough(val_samples=0)
    with pytest.raises(ValueError, match=re.escape("needs `num_users` >= 1")):
        EmbeddedClickThrough(num_users=0)


def test_the_recipe_sets_the_embedded_dataset_and_a_flag_scales_it() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ShardedStreamingDataModule, "data")
    recipe = yaml.safe_load(find_recipe("click_through").read_text())
    # The recipe's flag that scales the table, and one of a field both embedded datasets have, as on the command line.
    flags = ["--data.init_args.embedded_click_through.num_items=10000000"]
    flags += ["--data.init_args.embedded_click_through.seed=3"]
    data = parser.instantiate(parser.parse_args(["--data", yaml.safe_dump(recipe["data"]), *flags])).data
    expected = EmbeddedClickThrough(**recipe["data"]["init_args"]["embedded_click_through"])
    assert data.embedded == dataclasses.replace(expected, num_items=10_000_000, seed=3)
    fashion = yaml.safe_load(find_recipe("fashion_mnist").read_text())
    data = parser.instantiate(parser.parse_object({"data": fashion["data"]})).data
    assert isinstance(data.embedded, EmbeddedFashionMNIST)


def test_one_source_of_data() -> None:
    with pytest.raises(
        ValueError, match=re.escape("Give one embedded dataset: `embedded` or `embedded_click_through`")
    ):
        ShardedStreamingDataModule(embedded=EmbeddedFashionMNIST(), embedded_click_through=EmbeddedClickThrough())
    with pytest.raises(ValueError, match=re.escape("or `train_url`/`val_url`, not both")):
        ShardedStreamingDataModule(train_url="memory://x", embedded_click_through=EmbeddedClickThrough())
