"""`ShardedStreamingDataModule` offers every `StreamingDataset` option, whole, and a recipe can set each one."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import jsonargparse
import numpy as np
import pytest
import yaml

from lightning_patterns.data.caching import CacheConfig, MemoryEpochCache
from lightning_patterns.data.datamodule import ShardedStreamingDataModule
from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.streaming import RetryPolicy
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.options import ClassBalance, ReadAhead
from lightning_patterns.recipes import find_recipe

# Dataset arguments the DataModule fills in itself, and where from.
FILLED_IN = {
    "url": "train_url / val_url / test_url / predict_url",
    "rank": "the Trainer strategy's distributed_sampler_kwargs",
    "world_size": "the Trainer strategy's distributed_sampler_kwargs",
}


def _parameters(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]  # type: ignore[misc]
    return {name: hints[name] for name in names}


def _members(annotation: Any) -> set[Any]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set(typing.get_args(annotation))
    return {annotation}


def test_the_datamodule_signature_covers_the_datasets() -> None:
    dataset, datamodule = _parameters(StreamingDataset), _parameters(ShardedStreamingDataModule)
    missing = sorted(set(dataset) - set(datamodule) - set(FILLED_IN))
    assert not missing, f"StreamingDataset options with no way in through ShardedStreamingDataModule: {missing}"
    for name, annotation in dataset.items():
        if name in FILLED_IN:
            continue
        # An option group goes through whole: the DataModule takes the same config class.
        groups = {member for member in _members(annotation) if dataclasses.is_dataclass(member)}
        assert groups <= _members(datamodule[name]), f"{name}: the DataModule does not take {groups}"
    assert {ReadAhead, RetryPolicy, CacheConfig, ClassBalance} <= {
        member for annotation in datamodule.values() for member in _members(annotation)
    }


def test_every_option_reaches_the_dataset(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    samples = [{"x": np.float32(i), "label": np.int64(i % 2)} for i in range(64)]
    write_dataset(samples, url, num_shards=3, progress=False)
    read_ahead, retry = ReadAhead(shards=1, max_bytes=None, threads=2, timeout=30.0), RetryPolicy(max_attempts=2)
    data = ShardedStreamingDataModule(
        train_url=url,
        val_url=url,
        batch_size=8,
        eval_batch_size=4,
        seed=3,
        drop_last=True,
        shuffle_window=5,
        span_samples=7,
        read_ahead=read_ahead,
        retry=retry,
        cache=CacheConfig("memory", cache_limit=2**20),
        storage_options={"auto_mkdir": False},
        verify_checksums=False,
        class_balance=ClassBalance(2, num_classes=2, lookahead=16),
    )
    data.setup("fit")
    train, val = data.datasets["train"], data.datasets["val"]
    assert train.plan_config == dataclasses.replace(
        train.plan_config, batch_size=8, seed=3, shuffle=True, drop_last=True, shuffle_window=5, span_samples=7
    )
    assert (val.batch_size, val.plan_config.shuffle, val.plan_config.drop_last) == (4, False, False)
    for dataset in (train, val):
        assert dataset.read_ahead == read_ahead
        assert dataset._reader.retry == retry
        assert isinstance(dataset.cache, MemoryEpochCache)
        assert dataset.cache.cache_limit == 2**20
        assert dataset.storage_options == {"auto_mkdir": False}
        assert dataset.verify_checksums is False
    assert train.class_balance == ClassBalance(2, num_classes=2, lookahead=16)
    assert val.class_balance is None  # balance shapes training batches only
    assert all(int(np.bincount(batch["label"].numpy(), minlength=2).min()) >= 2 for batch in train)


RECIPE_OPTIONS = """
    span_samples: 512
    read_ahead:
      shards: 3
      max_bytes: null
      threads: 2
      timeout: 120
    retry:
      max_attempts: 4
      initial_backoff: 0.1
    cache:
      name: disk
      cache_dir: /local/ssd/lp
      cache_limit: 1073741824
    class_balance:
      min_per_class: 1
      num_classes: 10
"""


def _recipe_parser() -> jsonargparse.ArgumentParser:
    """The `data:` part of a recipe, read as LightningCLI reads it (a subclass of the DataModule, nested YAML)."""
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ShardedStreamingDataModule, "data")
    return parser


def test_a_recipe_sets_every_option_group_as_nested_yaml() -> None:
    recipe = yaml.safe_load(find_recipe("fashion_mnist").read_text())
    recipe["data"]["init_args"].pop("cache")
    recipe["data"]["init_args"].update(yaml.safe_load(textwrap.dedent(RECIPE_OPTIONS)))
    parser = _recipe_parser()
    data = parser.instantiate(parser.parse_object({"data": recipe["data"]})).data
    assert isinstance(data, ShardedStreamingDataModule)
    assert data.span_samples == 512
    assert data.read_ahead == ReadAhead(shards=3, max_bytes=None, threads=2, timeout=120.0)
    assert data.retry == RetryPolicy(max_attempts=4, initial_backoff=0.1)
    assert data.cache == CacheConfig("disk", cache_dir="/local/ssd/lp", cache_limit=2**30)
    assert data.class_balance == ClassBalance(1, num_classes=10)
    # The flat shorthands and dotted command-line overrides still work.
    args = ["--data", "lightning_patterns.data.datamodule.ShardedStreamingDataModule"]
    args += ["--data.init_args.read_ahead.threads=8", "--data.init_args.cache=disk", "--data.init_args.cache_dir=/x"]
    args += ["--data.init_args.min_per_class=2"]
    data = parser.instantiate(parser.parse_args(args)).data
    assert (data.read_ahead, data.cache, data.cache_dir, data.min_per_class) == (ReadAhead(threads=8), "disk", "/x", 2)


def test_an_invalid_option_in_a_recipe_names_it() -> None:
    parser = _recipe_parser()
    args = ["--data", "lightning_patterns.data.datamodule.ShardedStreamingDataModule"]
    config = parser.parse_args([*args, "--data.init_args.read_ahead.threads=0"])
    with pytest.raises(ValueError, match=r"ReadAhead\(threads=0\) must be an integer >= 1"):
        parser.instantiate(config)
