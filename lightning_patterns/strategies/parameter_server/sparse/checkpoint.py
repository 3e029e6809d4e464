"""Sharded checkpoints of sparse tables: each server writes its own rows, a JSON manifest ties them together.

Layout under the checkpoint directory (a local folder; servers share it, as TF's sharded saves do)::

    sparse/manifest.json
    sparse/table-<t>/server-<s>-of-<S>/ids.npy          int64 [n], ascending: the rows server s created
    sparse/table-<t>/server-<s>-of-<S>/values.npy       [n, dim]
    sparse/table-<t>/server-<s>-of-<S>/state-<name>.npy [n, dim], one per optimizer state

Each server calls :func:`save_shard` for its tables (no communication; it returns a small JSON entry); one
process gathers the entries and calls :func:`write_manifest` last, so a manifest exists only when every shard is
written. Rows never touched are not stored: their value is the table's initialiser's, a pure function of the row
(:class:`~.table.TableSpec`). Files are ``.npy`` read with ``allow_pickle=False``, named by table index and server,
never by a path from the manifest (nothing in it can point outside the directory), and checked against the
manifest's row counts, shapes, dtypes and SHA-256 digests.

Loading for another number of servers re-shards: server ``s'`` of ``S'`` reads the ids of every old shard
(memory-mapped) and keeps the rows the new rule places on it (:func:`load_shard`). A table small enough for one
process loads whole (:func:`load_full_table`) into a plain module (:func:`load_into_module`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowOptimizer
from lightning_patterns.strategies.parameter_server.sparse.sharding import RowSharding, row_sharding_from_json
from lightning_patterns.strategies.parameter_server.sparse.store import RowStore, TableShardArrays
from lightning_patterns.strategies.parameter_server.sparse.table import TableSpec

__all__ = [
    "FORMAT",
    "SparseCheckpointError",
    "TableCheckpoint",
    "load_full_table",
    "load_into_module",
    "load_shard",
    "read_manifest",
    "save_shard",
    "shard_folder",
    "write_manifest",
]

FORMAT = "lightning_patterns.sparse_checkpoint"
_VERSION = 1
_FOLDER = "sparse"
_MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 * 2**20
_NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


class SparseCheckpointError(ValueError):
    """A sparse checkpoint that is missing, incomplete, or does not match its manifest."""


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: store the bits
        return tensor.contiguous().view(torch.int16).numpy()
    return tensor.contiguous().numpy()


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a writable copy, also of a read-only memory map
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def shard_folder(directory: str | os.PathLike[str], table_index: int, server: int, num_servers: int) -> Path:
    """The folder of server ``server``'s rows of table number ``table_index``."""
    return Path(directory) / _FOLDER / f"table-{table_index:03d}" / f"server-{server:05d}-of-{num_servers:05d}"


def _save_array(folder: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    np.save(folder / f"{name}.npy", array, allow_pickle=False)
    return {"shape": list(array.shape), "sha256": hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()}


def save_shard(directory: str | os.PathLike[str], table_index: int, store: RowStore) -> dict[str, Any]:
    """Write ``store``'s created rows and optimizer state; return the manifest entry of this shard."""
    folder = shard_folder(directory, table_index, store.server, store.sharding.num_servers)
    folder.mkdir(parents=True, exist_ok=True)
    ids, values, state = store.export()
    files = {"ids": _save_array(folder, "ids", ids.numpy()), "values": _save_array(folder, "values", _numpy(values))}
    for name, tensor in state.items():
        files[f"state-{name}"] = _save_array(folder, f"state-{name}", _numpy(tensor))
    return {"server": store.server, "num_rows": int(ids.numel()), "files": files}


@dataclass(frozen=True)
class TableCheckpoint:
    """One table of a sparse checkpoint: what it is, how it was sharded and optimized, and its shards."""

    index: int
    table: TableSpec
    sharding: RowSharding
    optimizer: RowOptimizer
    step: int
    shards: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {
            "index": self.index,
            "table": self.table.to_json(),
            "sharding": self.sharding.to_json(),
            "optimizer": self.optimizer.to_json(),
            "step": self.step,
            "shards": sorted(self.shards, key=lambda shard: int(shard["server"])),
        }


def write_manifest(directory: str | os.PathLike[str], tables: list[TableCheckpoint]) -> Path:
    """Write the manifest (atomically, after every shard): the checkpoint is complete once it exists."""
    path = Path(directory) / _FOLDER / _MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": FORMAT, "version": _VERSION, "tables": [table.to_json() for table in tables]}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1), encoding="utf-8")
    os.replace(temporary, path)
    return path


def _parse_table(entry: Any, where: Path) -> TableCheckpoint:
    try:
        table = TableSpec.from_json(entry["table"])
        sharding = row_sharding_from_json(entry["sharding"])
        optimizer = RowOptimizer.from_json(entry["optimizer"])
        index, step, shards = int(entry["index"]), int(entry["step"]), tuple(entry["shards"])
    except (KeyError, TypeError, ValueError) as error:
        raise SparseCheckpointError(f"{where}: a table entry is malformed ({error}).") from None
    servers = sorted(int(shard.get("server", -1)) for shard in shards if isinstance(shard, dict))
    if servers != list(range(sharding.num_servers)) or sharding.num_rows != table.num_rows:
        raise SparseCheckpointError(
            f"{where}: table {table.name!r} lists shards of servers {servers}, expected one for each of the "
            f"{sharding.num_servers} servers of its sharding. The checkpoint is incomplete: resume from another one."
        )
    return TableCheckpoint(index, table, sharding, optimizer, step, shards)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, TableCheckpoint]:
    """The tables of the checkpoint in ``directory``, by name; :class:`SparseCheckpointError` if invalid."""
    path = Path(directory) / _FOLDER / _MANIFEST
    if not path.is_file():
        raise SparseCheckpointError(
            f"No sparse checkpoint in {directory}: {path} does not exist. It is written last, so the save was "
            f"interrupted or this directory holds another kind of checkpoint."
        )
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise SparseCheckpointError(f"{path} is larger than {_MAX_MANIFEST_BYTES} bytes; it is not our manifest.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SparseCheckpointError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != _VERSION:
        raise SparseCheckpointError(
            f"{path} is not a sparse checkpoint manifest of version {_VERSION} (format {FORMAT!r}); it was written "
            f"by another tool or version."
        )
    tables = [_parse_table(entry, path) for entry in document.get("tables", [])]
    return {table.table.name: table for table in tables}


def _table(directory: str | os.PathLike[str], name: str) -> TableCheckpoint:
    tables = read_manifest(directory)
    if name not in tables:
        raise SparseCheckpointError(
            f"The sparse checkpoint in {directory} has no table {name!r}; it has {sorted(tables)}."
        )
    return tables[name]


def _load_array(folder: Path, name: str, expected: dict[str, Any], dtype: Any, mmap: bool) -> np.ndarray:
    path = folder / f"{name}.npy"
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as error:
        raise SparseCheckpointError(f"Cannot read {path}: {error}. The checkpoint is incomplete or damaged.") from None
    if list(array.shape) != list(expected["shape"]) or array.dtype != np.dtype(dtype):
        raise SparseCheckpointError(
            f"{path} holds {array.dtype} of shape {list(array.shape)}; the manifest says {np.dtype(dtype)} of shape "
            f"{expected['shape']}. The file does not belong to this checkpoint."
        )
    if hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() != expected["sha256"]:
        raise SparseCheckpointError(f"{path} does not match its SHA-256 digest in the manifest: the file is damaged.")
    return array  # type: ignore[no-any-return]


def _shard_arrays(
    directory: str | os.PathLike[str], entry: TableCheckpoint, shard: dict[str, Any], mmap: bool
) -> dict[str, np.ndarray]:
    folder = shard_folder(directory, entry.index, int(shard["server"]), entry.sharding.num_servers)
    files = shard.get("files", {})
    value_dtype = np.int16 if entry.table.dtype == "bfloat16" else _NUMPY_DTYPES[entry.table.dtype]
    names = ["ids", "values", *(f"state-{name}" for name in entry.optimizer.state_names)]
    missing = [name for name in names if name not in files]
    if missing:
        raise SparseCheckpointError(f"The manifest lists no files {missing} for {folder}.")
    return {
        name: _load_array(folder, name, files[name], np.int64 if name == "ids" else value_dtype, mmap) for name in names
    }


def load_shard(
    directory: str | os.PathLike[str], name: str, sharding: RowSharding, server: int
) -> tuple[TableShardArrays, int]:
    """The checkpointed rows of table ``name`` that ``server`` holds under ``sharding`` (any number of servers).

    Reads every old shard's ids (memory-mapped) and keeps the rows the new rule places on ``server``.

    Returns:
        ``((ids, values, state), step)``, ready for :meth:`~.store.RowStore.load`.
    """
    entry = _table(directory, name)
    if sharding.num_rows != entry.table.num_rows:
        raise SparseCheckpointError(
            f"Table {name!r} has {entry.table.num_rows} rows in the checkpoint but {sharding.num_rows} in this run: "
            f"the module's `num_embeddings` changed. Resume with the same table size."
        )
    parts: dict[str, list[np.ndarray]] = {}
    for shard in entry.shards:
        arrays = _shard_arrays(directory, entry, shard, mmap=True)
        keep = sharding.server_of(np.asarray(arrays["ids"])) == server
        for key, array in arrays.items():
            parts.setdefault(key, []).append(np.asarray(array[keep]))
    dtype = entry.table.torch_dtype
    ids = torch.from_numpy(np.concatenate(parts.pop("ids")))
    values = _tensor(np.concatenate(parts.pop("values")), dtype)
    state = {key.removeprefix("state-"): _tensor(np.concatenate(arrays), dtype) for key, arrays in parts.items()}
    return (ids, values, state), entry.step


def load_full_table(directory: str | os.PathLike[str], name: str) -> torch.Tensor:
    """Table ``name`` whole, ``[num_rows, dim]``: checkpointed rows, and the initialiser's value for the others.

    For tables that fit one process (the result takes ``num_rows × dim × itemsize`` bytes).
    """
    entry = _table(directory, name)
    table = torch.empty(entry.table.num_rows, entry.table.dim, dtype=entry.table.torch_dtype)
    chunk = 1 << 20
    for start in range(0, entry.table.num_rows, chunk):
        stop = min(start + chunk, entry.table.num_rows)
        table[start:stop] = entry.table.initial_rows(np.arange(start, stop))
    for shard in entry.shards:
        arrays = _shard_arrays(directory, entry, shard, mmap=True)
        ids = torch.from_numpy(np.array(arrays["ids"]))
        table.index_copy_(0, ids, _tensor(arrays["values"], entry.table.torch_dtype))
    return table


def load_into_module(directory: str | os.PathLike[str], module: nn.Module) -> list[str]:
    """Copy every table of the checkpoint into ``module``'s embedding of the same qualified name; returns the names.

    The tables are named after the modules that held them (``"item_embedding"``), so a plain single-process
    module of the same class takes them back.
    """
    loaded = []
    for name in sorted(read_manifest(directory)):
        try:
            target = module.get_submodule(name)
        except AttributeError:
            raise SparseCheckpointError(
                f"The sparse checkpoint has table {name!r}, but {type(module).__name__} has no submodule of that "
                f"name. Load it into the module class it was trained with."
            ) from None
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise SparseCheckpointError(f"Submodule {name!r} of {type(module).__name__} has no `weight` to load into.")
        table = load_full_table(directory, name)
        if weight.shape != table.shape:
            raise SparseCheckpointError(
                f"Table {name!r} is {list(table.shape)} in the checkpoint but {list(weight.shape)} in the module."
            )
        with torch.no_grad():
            weight.copy_(table)
        loaded.append(name)
    return loaded
