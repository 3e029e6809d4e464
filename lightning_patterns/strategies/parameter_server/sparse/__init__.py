"""Sparse embedding tables on the parameter servers (``ParameterServerStrategy(sparse_modules=...)``).

**Status** (issue #14): the strategy uses them (:mod:`.wiring`, :mod:`.embeddings`, :mod:`.client`,
:mod:`.serving`, :mod:`.protocol`), in sync and async modes (async: each push is applied on arrival; the dense
part's ``max_staleness`` bounds how far a worker runs ahead), and in PERSIA's hybrid
(``ParameterServerStrategy(mode="sync", sparse_mode="async", sparse_max_staleness=k)``: the dense part synchronous,
its path unchanged; the tables' rows pushed after the dense step and applied on arrival; a pull at step ``t``
answered once every worker's pushes of the steps before ``t - k`` are applied; the end-of-fit gather and
checkpoints wait for every push). Modules:

- :mod:`.sharding`: which server holds which row (``"hash"``: SplitMix64 of the row id with a per-table salt,
  the default; ``"range"``: contiguous ranges);
- :mod:`.table`: a table's description and the initialiser that creates a row on first use (``nn.Embedding``'s
  ``N(0, 1)`` by default), a pure function of the row;
- :mod:`.store`: a server's rows of one table, created lazily, updated row-wise;
- :mod:`.optimizers`: SGD and Adagrad (exact: equal to dense training on the touched rows), Adam and AdamW (lazy,
  as ``torch.optim.SparseAdam``), and the mapping from a torch optimizer's param group;
- :mod:`.gradients`: a batch's unique ids, their routes to servers, gradients summed per unique row;
- :mod:`.wire`: pull and push as raw tensors with a fixed header;
- :mod:`.checkpoint`: each server saves its rows, a manifest ties them, loading re-shards.

**Design of the strategy's side** (implemented; differences: the threshold is ``sparse_min_rows``, ``None``
turns detection off; ``scale_grad_by_freq`` and ``EmbeddingBag(mode="max")`` are accepted, since the compact
table's autograd computes what a dense table's would on the worker's batch, as under DDP; sparse messages are
headers of :mod:`..messages` with ``ids``/``rows`` payloads, :mod:`.protocol`, rather than :mod:`.wire`'s
headers; the tables' step pushes go at the end of each optimizer step's closure, not from a gradient hook):

(a) *Which modules.* ``ParameterServerStrategy(sparse_modules=[...])`` names modules by qualified name
(``["user_embedding", "item_embedding"]``); by default every ``nn.Embedding`` and ``nn.EmbeddingBag`` whose
weight has at least ``sparse_threshold`` rows (default 100,000; ``0`` turns detection off) is sparse. Detected in
``setup`` on the LightningModule, before the optimizer is built. Unsupported options are refused with the fix:
``max_norm`` (renormalises rows on lookup, a server-side write the pull does not see), ``scale_grad_by_freq``
(needs the global batch's counts), ``EmbeddingBag(mode="max")`` (its gradient picks one row per bag; possible later).

(b) *Never the full table on a worker.* A table built in ``__init__`` exists once on each worker while the module
is constructed: rank 0 assigns its rows to the servers (so training starts from the module's own initial values,
which makes the dense-equivalence tests exact), then every worker frees it. A table built in the module's
``configure_model`` (as :class:`~lightning_patterns.models.EmbeddingCTR` does) is built on the meta device inside
the strategy's ``model_sharded_context`` and never allocated: servers create its rows with the table's
initialiser. The module's ``weight`` parameter becomes a small per-batch buffer: a forward pre-hook on the
embedding takes the batch's ids, deduplicates them (:func:`.gradients.unique_ids`), pulls the unique rows from
their servers (:func:`.gradients.route_ids`, :class:`.wire.RowPull`), installs them as a compact ``[unique, dim]``
leaf tensor that requires grad, and replaces the ids by their positions among the unique ids (``EmbeddingBag``
offsets and per-sample weights pass unchanged; ``padding_idx`` is remapped to its compact position for the batch).
The module's own ``forward`` then runs on the compact table, so every mode and dtype behaves as before. A hook on
that leaf's gradient pushes ``[unique, dim]`` gradients (autograd has already summed repeated ids) to their
servers (:class:`.wire.RowPush`); the server sums the workers' pushes per row, divides by the number of workers,
and applies the row optimizer. The dense parameters keep the existing dense path, so a module mixes both; in sync
mode the next pull waits for the step, in async mode the sparse part may run with bounded staleness like the dense
part (PERSIA's hybrid). Worker memory is then set by the batch, not the table: peak RSS independent of
``num_rows``.

(c) *Optimizer.* The module's own ``configure_optimizers`` decides: the param group that holds a sparse table's
weight names the class and hyperparameters, mapped by :func:`.optimizers.row_optimizer_from_torch` (SGD and Adagrad
exact; Adam/AdamW lazy, logged once; others refused with the fix). The strategy removes the sparse weights from
the worker's optimizer (a group left empty stays, so schedulers and group indices are unchanged) and sends each
group's changed hyperparameters with the next push, as the dense path does, so ``lr`` schedulers work.

(d) *Telemetry.* Two new counters beside the dense ``ps/`` ones: ``ps/sparse_rows`` (unique rows pulled in the
step, summed over tables) and ``ps/sparse_bytes`` (bytes of sparse pulls, replies and pushes, headers included),
whose theory is :func:`.wire.step_bytes`; the issue's bound is within 5 % of it.

(e) *Transport.* Sparse messages have sizes known only per batch: the transport must carry a header, then
payloads whose sizes the header announces (:func:`.wire.payload_specs`), between a worker and each server it
touches, with ids ``int64`` and rows in the table's dtype; a pull is a request-reply, a push a one-way message
the server acknowledges at the step boundary. Servers need per-table state (a :class:`.store.RowStore` each) that
the fit's INIT message announces (table specs, shardings, optimizers as JSON), and the checkpoint hooks must let
every server write its shard (:func:`.checkpoint.save_shard`) before one rank writes the manifest.
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "HashRowSharding",
    "ROW_OPTIMIZERS",
    "ROW_SHARDINGS",
    "RangeRowSharding",
    "RowAdagrad",
    "RowAdam",
    "RowGradientAccumulator",
    "RowInitializer",
    "RowOptimizer",
    "RowSGD",
    "RowSharding",
    "RowStore",
    "SparseCheckpointError",
    "TableSpec",
    "load_full_table",
    "load_into_module",
    "load_shard",
    "read_manifest",
    "route_ids",
    "row_optimizer_from_torch",
    "save_shard",
    "unique_ids",
    "write_manifest",
]

_PACKAGE = "lightning_patterns.strategies.parameter_server.sparse"
__getattr__ = lazy_exports(
    __name__,
    {
        **{
            name: f"{_PACKAGE}.sharding:{name}"
            for name in ("ROW_SHARDINGS", "HashRowSharding", "RangeRowSharding", "RowSharding")
        },
        **{
            name: f"{_PACKAGE}.optimizers:{name}"
            for name in (
                "ROW_OPTIMIZERS",
                "RowAdagrad",
                "RowAdam",
                "RowOptimizer",
                "RowSGD",
                "row_optimizer_from_torch",
            )
        },
        **{name: f"{_PACKAGE}.table:{name}" for name in ("RowInitializer", "TableSpec")},
        **{name: f"{_PACKAGE}.gradients:{name}" for name in ("RowGradientAccumulator", "route_ids", "unique_ids")},
        "RowStore": f"{_PACKAGE}.store:RowStore",
        **{
            name: f"{_PACKAGE}.checkpoint:{name}"
            for name in (
                "SparseCheckpointError",
                "load_full_table",
                "load_into_module",
                "load_shard",
                "read_manifest",
                "save_shard",
                "write_manifest",
            )
        },
    },
)
