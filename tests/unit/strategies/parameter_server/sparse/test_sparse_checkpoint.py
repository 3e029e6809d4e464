"""Sharded checkpoints: each server its own files, a manifest, re-sharding on load, a plain module loads them whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_patterns.strategies.parameter_server.sparse import (
    HashRowSharding,
    RangeRowSharding,
    RowAdagrad,
    RowSharding,
    RowStore,
    SparseCheckpointError,
    TableSpec,
    load_full_table,
    load_into_module,
    load_shard,
    read_manifest,
    save_shard,
    write_manifest,
)
from lightning_patterns.strategies.parameter_server.sparse.checkpoint import TableCheckpoint, shard_folder

TABLE = TableSpec("item_embedding", num_rows=500, dim=4, seed=3)


def _trained_stores(sharding: RowSharding) -> list[RowStore]:
    """Stores of every server after three steps touching about half the table (so most rows are created)."""
    stores = [RowStore(TABLE, sharding, server, RowAdagrad(lr=0.5)) for server in range(sharding.num_servers)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.unique(torch.randint(0, 250, (200,), generator=generator))
        servers = torch.from_numpy(sharding.server_of(ids))
        for store in stores:
            mine = ids[servers == store.server]
            store.apply(mine, torch.randn(len(mine), 4, generator=generator))
    return stores


def _save(directory: Path, stores: list[RowStore]) -> None:
    entries = tuple(save_shard(directory, 0, store) for store in stores)
    first = stores[0]
    write_manifest(directory, [TableCheckpoint(0, TABLE, first.sharding, first.optimizer, first.step, entries)])


def _rows(stores: list[RowStore]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Row id → (value, Adagrad sum) over every store."""
    rows = {}
    for store in stores:
        ids, values, state = store.export()
        for i, row in enumerate(ids.tolist()):
            rows[row] = (values[i], state["sum"][i])
    return rows


@pytest.mark.parametrize("new_servers", [1, 2, 3, 5])
def test_save_on_two_servers_load_on_any_number(tmp_path: Path, new_servers: int) -> None:
    sharding = HashRowSharding(TABLE.num_rows, 2, salt=TABLE.salt)
    stores = _trained_stores(sharding)
    _save(tmp_path, stores)
    assert sorted(p.name for p in (tmp_path / "sparse" / "table-000").iterdir()) == [
        "server-00000-of-00002",
        "server-00001-of-00002",
    ]
    resharded = sharding.resharded(new_servers)
    loaded = []
    for server in range(new_servers):
        arrays, step = load_shard(tmp_path, TABLE.name, resharded, server)
        store = RowStore(TABLE, resharded, server, RowAdagrad(lr=0.5))
        store.load(*arrays, step=step)
        loaded.append(store)
    before, after = _rows(stores), _rows(loaded)
    assert sorted(after) == sorted(before)
    for row, (value, square_sum) in before.items():
        assert torch.equal(after[row][0], value)
        assert torch.equal(after[row][1], square_sum)
    assert all(store.step == 3 for store in loaded)


def test_full_table_has_trained_rows_and_initial_values_elsewhere(tmp_path: Path) -> None:
    stores = _trained_stores(RangeRowSharding(TABLE.num_rows, 3))
    _save(tmp_path, stores)
    table = load_full_table(tmp_path, TABLE.name)
    rows = _rows(stores)
    created = torch.tensor(sorted(rows))
    assert torch.equal(table[created], torch.stack([rows[r][0] for r in sorted(rows)]))
    untouched = np.setdiff1d(np.arange(TABLE.num_rows), created.numpy())
    assert len(untouched) > 200
    assert torch.equal(table[torch.from_numpy(untouched)], TABLE.initial_rows(untouched))

    module = torch.nn.Module()
    module.item_embedding = torch.nn.Embedding(TABLE.num_rows, 4)
    assert load_into_module(tmp_path, module) == ["item_embedding"]
    assert torch.equal(module.item_embedding.weight.detach(), table)


def test_manifest_describes_every_table(tmp_path: Path) -> None:
    stores = _trained_stores(HashRowSharding(TABLE.num_rows, 2, salt=TABLE.salt))
    _save(tmp_path, stores)
    entry = read_manifest(tmp_path)[TABLE.name]
    assert entry.table == TABLE
    assert entry.sharding == stores[0].sharding
    assert entry.optimizer == RowAdagrad(lr=0.5)
    assert [shard["num_rows"] for shard in entry.shards] == [store.num_created for store in stores]


def _corrupt(directory: Path, change: str) -> None:
    manifest = directory / "sparse" / "manifest.json"
    document = json.loads(manifest.read_text())
    if change == "drop_shard":
        document["tables"][0]["shards"].pop()
    elif change == "version":
        document["version"] = 99
    elif change == "json":
        manifest.write_text("{")
        return
    elif change == "shape":
        document["tables"][0]["shards"][0]["files"]["values"]["shape"] = [1, 4]
    elif change == "bytes":
        values = shard_folder(directory, 0, 0, 2) / "values.npy"
        data = bytearray(values.read_bytes())
        data[-1] ^= 0xFF
        values.write_bytes(bytes(data))
        return
    elif change == "missing_file":
        (shard_folder(directory, 0, 1, 2) / "state-sum.npy").unlink()
        return
    manifest.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_shard", "lists shards of servers [0], expected one for each of the 2 servers"),
        ("version", "is not a sparse checkpoint manifest of version 1"),
        ("json", "is not valid JSON"),
        ("shape", "the manifest says float32 of shape [1, 4]"),
        ("bytes", "does not match its SHA-256 digest in the manifest"),
        ("missing_file", "state-sum.npy: "),
    ],
)
def test_damaged_checkpoints_are_refused(tmp_path: Path, change: str, message: str) -> None:
    sharding = HashRowSharding(TABLE.num_rows, 2, salt=TABLE.salt)
    _save(tmp_path, _trained_stores(sharding))
    _corrupt(tmp_path, change)
    with pytest.raises(SparseCheckpointError, match=re.escape(message)):  # noqa: PT012  # either shard may be hit
        for server in range(2):
            load_shard(tmp_path, TABLE.name, sharding, server)


def test_loading_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SparseCheckpointError, match="It is written last, so the save was interrupted"):
        read_manifest(tmp_path)
    sharding = RangeRowSharding(TABLE.num_rows, 2)
    _save(tmp_path, _trained_stores(sharding))
    with pytest.raises(SparseCheckpointError, match=re.escape("has no table 'users'; it has ['item_embedding']")):
        load_full_table(tmp_path, "users")
    with pytest.raises(SparseCheckpointError, match=re.escape("the module's `num_embeddings` changed")):
        load_shard(tmp_path, TABLE.name, RangeRowSharding(600, 2), 0)
    module = torch.nn.Module()
    with pytest.raises(SparseCheckpointError, match="has no submodule of that name"):
        load_into_module(tmp_path, module)
    module.item_embedding = torch.nn.Embedding(400, 4)
    with pytest.raises(
        SparseCheckpointError, match=re.escape("is [500, 4] in the checkpoint but [400, 4] in the module")
    ):
        load_into_module(tmp_path, module)
