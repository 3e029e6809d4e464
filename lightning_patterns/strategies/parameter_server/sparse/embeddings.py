"""How the strategy turns a module's ``nn.Embedding`` / ``nn.EmbeddingBag`` into tables held by the servers.

Which modules: the qualified names of ``ParameterServerStrategy(sparse_modules=[...])``, or else every embedding
whose table has at least ``sparse_min_rows`` rows (:func:`choose_sparse_modules`).

Never the full table on a worker:

- a table built in ``configure_model`` (as :class:`~lightning_patterns.models.EmbeddingCTR` builds its own) is
  built on the meta device inside the strategy's ``model_sharded_context`` (:func:`meta_embeddings`): nothing is
  allocated, and the initialisation the module asks for (``nn.init.normal_(weight, std=0.01)``, or the
  embedding's own ``N(0, 1)``) is recorded as the table's :class:`~.table.RowInitializer`; the servers create
  each row with it the first time a batch touches it;
- a table built in ``__init__`` exists once per worker while the module is constructed; worker rank 0 sends its
  rows to the servers (training then starts from the module's own values), and every worker frees it.

The module's ``weight`` parameter is removed (:class:`SparseEmbeddings`). A forward pre-hook deduplicates the
batch's ids, pulls the unique rows, installs them as a compact ``[unique, dim]`` leaf tensor as the module's
``weight`` and hands the module's own ``forward`` the ids remapped to positions in it (``padding_idx``
remapped too), so every mode, offset and per-sample weight behaves as before. A hook on that leaf's gradient
(autograd has summed repeated ids) adds it to the table's gradients of the step, pushed once per optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_patterns.strategies.parameter_server.sparse.client import SparseClient, SparseTable
from lightning_patterns.strategies.parameter_server.sparse.gradients import unique_ids
from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowAdam, row_optimizer_from_torch
from lightning_patterns.strategies.parameter_server.sparse.sharding import HashRowSharding
from lightning_patterns.strategies.parameter_server.sparse.table import ROW_DTYPES, RowInitializer, TableSpec

__all__ = ["SparseEmbeddings", "choose_sparse_modules", "materialize", "meta_embeddings"]

log = logging.getLogger(__name__)

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_DTYPE_NAMES = {dtype: name for name, dtype in ROW_DTYPES.items()}
#: The initialisers the meta context records, by torch function.
_INITS: dict[Any, Callable[..., RowInitializer]] = {
    nn.init.normal_: lambda tensor, mean=0.0, std=1.0, **_: RowInitializer("normal", mean=mean, std=std),
    nn.init.uniform_: lambda tensor, a=0.0, b=1.0, **_: RowInitializer("uniform", low=a, high=b),
    nn.init.zeros_: lambda tensor, **_: RowInitializer("zeros"),
    torch._C.TensorBase.normal_: lambda tensor, mean=0.0, std=1.0, **_: RowInitializer("normal", mean=mean, std=std),
    torch._C.TensorBase.uniform_: lambda tensor, low=0.0, high=1.0, **_: RowInitializer("uniform", low=low, high=high),
    torch._C.TensorBase.zero_: lambda tensor, **_: RowInitializer("zeros"),
}


def _rows(module: nn.Module) -> int:
    return int(getattr(module, "num_embeddings", 0))


def choose_sparse_modules(model: nn.Module, names: list[str] | None, min_rows: int | None) -> dict[str, nn.Module]:
    """The embeddings of ``model`` to hold on the servers, by qualified name.

    Raises:
        ValueError: a named module that does not exist or is not an embedding, or an embedding with ``max_norm``.
    """
    chosen: dict[str, nn.Module] = {}
    if names is not None:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                embeddings = [n for n, m in model.named_modules() if isinstance(m, _EMBEDDINGS)]
                raise ValueError(
                    f"`ParameterServerStrategy(sparse_modules=[..., {name!r}, ...])`: {type(model).__name__} has no "
                    f"submodule {name!r}. Its embeddings are {embeddings}; name modules by their qualified name."
                ) from None
            if not isinstance(module, _EMBEDDINGS):
                raise ValueError(
                    f"`ParameterServerStrategy(sparse_modules=[..., {name!r}, ...])` names a {type(module).__name__}; "
                    "only nn.Embedding and nn.EmbeddingBag tables can live on the servers."
                )
            chosen[name] = module
    elif min_rows is not None:
        chosen = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, _EMBEDDINGS) and _rows(module) >= min_rows and _weight(module).requires_grad
        }
    for name, module in chosen.items():
        if getattr(module, "max_norm", None) is not None:
            raise ValueError(
                f"Embedding {name!r} has max_norm={module.max_norm!r}, which renormalises rows on lookup: a write "
                "the servers would not see. Drop max_norm, or keep the table dense by leaving it out of "
                "`sparse_modules` (or raising `sparse_min_rows` above its rows)."
            )
    return chosen


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module._parameters.get("weight")
    assert weight is not None, "an embedding without its weight"
    return weight


class _RecordInit(TorchFunctionMode):
    """Records the initialisation asked of meta embedding weights (and skips it: meta tensors hold nothing)."""

    def __init__(self, recorded: dict[int, RowInitializer]) -> None:
        super().__init__()
        self.recorded = recorded

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if func in _INITS and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            # `Tensor.uniform_` names its bounds `from` and `to`, which are not Python names.
            kwargs = {{"from": "low", "to": "high"}.get(key, key): value for key, value in kwargs.items()}
            kwargs.pop("tensor", None)
            self.recorded[id(tensor)] = _INITS[func](tensor, *args[1:], **kwargs)
            return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_embeddings(min_rows: int | None, recorded: dict[int, RowInitializer]) -> Generator[None, None, None]:
    """Build embeddings of at least ``min_rows`` rows (``None``: every one) on the meta device; record their init."""
    originals = {cls: cls.__init__ for cls in _EMBEDDINGS}
    for cls in _EMBEDDINGS:

        def init(
            self: nn.Module, num_embeddings: int, *args: Any, _original: Any = originals[cls], **kwargs: Any
        ) -> None:
            if min_rows is None or num_embeddings >= min_rows:
                kwargs["device"] = "meta"
            _original(self, num_embeddings, *args, **kwargs)

        cls.__init__ = init  # type: ignore[method-assign]
    try:
        with _RecordInit(recorded):
            yield
    finally:
        for cls, original in originals.items():
            cls.__init__ = original  # type: ignore[method-assign]


def _set_padding(module: nn.Module, padding: int | None) -> None:
    vars(module)["padding_idx"] = padding


def materialize(module: nn.Module, initializer: RowInitializer) -> None:
    """Allocate a meta embedding's weight after all (a module the strategy keeps dense) and initialise it."""
    weight = _weight(module)
    values = torch.empty(weight.shape, dtype=weight.dtype)
    with torch.no_grad():
        if initializer.distribution == "normal":
            values.normal_(initializer.mean, initializer.std)
        elif initializer.distribution == "uniform":
            values.uniform_(initializer.low, initializer.high)
        else:
            values.zero_()
        padding = getattr(module, "padding_idx", None)
        if padding is not None:
            values[padding] = 0
    module._parameters["weight"] = nn.Parameter(values, requires_grad=weight.requires_grad)


class SparseEmbeddings:
    """The sparse tables of one fit on a worker: the modules, their removed weights, their hooks.

    Args:
        modules: the embeddings to hold on the servers, by qualified name.
        initializers: initialisers recorded for meta weights, by ``id`` of the weight.
        num_servers: servers of the job.
        keep_values: keep the initial values of weights built in full (worker rank 0, which assigns them).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        initializers: dict[int, RowInitializer],
        num_servers: int,
        keep_values: bool,
    ) -> None:
        self.modules = modules
        self.names = list(modules)
        self.initial: dict[str, torch.Tensor | None] = {}
        self.meta: dict[str, nn.Parameter] = {}
        self.specs: list[TableSpec] = []
        self.group_of: list[int] = []
        self.tables: list[SparseTable] = []
        self.client: SparseClient | None = None
        self.device = torch.device("cpu")
        #: Called before every pull (the strategy settles the dense replies still owed, so replies arrive in order).
        self.before_pull: Callable[[], None] = lambda: None
        self._handles: list[Any] = []
        self._padding: dict[str, int | None] = {}
        for name, module in modules.items():
            weight = module._parameters.pop("weight")
            assert weight is not None
            dtype = _DTYPE_NAMES.get(weight.dtype)
            if dtype is None:
                raise ValueError(
                    f"Embedding {name!r} has dtype {weight.dtype}; tables on the servers hold {', '.join(ROW_DTYPES)}."
                )
            initializer = initializers.get(id(weight), RowInitializer())
            padding = getattr(module, "padding_idx", None)
            self.specs.append(TableSpec(name, weight.shape[0], weight.shape[1], dtype, initializer, padding))
            self.initial[name] = None if weight.is_meta or not keep_values else weight.detach().to("cpu")
            self.meta[name] = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
            self.meta[name].requires_grad_(weight.requires_grad)
            self._padding[name] = padding
        self.num_servers = num_servers

    @property
    def num_rows(self) -> int:
        """Rows of all tables."""
        return sum(spec.num_rows for spec in self.specs)

    @contextmanager
    def weights_for_optimizer(self) -> Generator[None, None, None]:
        """Put meta weights back while ``configure_optimizers`` runs: the param groups then name the tables."""
        for name, module in self.modules.items():
            module._parameters["weight"] = self.meta[name]
        try:
            yield
        finally:
            for module in self.modules.values():
                module._parameters.pop("weight", None)

    def take_from_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the tables from ``optimizer`` and take their row optimizers from their param groups.

        A group left empty stays, so schedulers and group indices are unchanged.
        """
        for spec, name in zip(self.specs, self.names, strict=True):
            meta = self.meta[name]
            groups = [g for g, group in enumerate(optimizer.param_groups) if any(p is meta for p in group["params"])]
            if not groups:
                raise ValueError(
                    f"Embedding {name!r} is held on the servers, but no param group of `configure_optimizers` holds "
                    "its weight. Add it to the optimizer (its group's optimizer updates its rows), or leave it out "
                    "of `sparse_modules`."
                )
            group = optimizer.param_groups[groups[0]]
            row_optimizer = row_optimizer_from_torch(type(optimizer), group)
            if isinstance(row_optimizer, RowAdam):
                log.info(
                    "table %r: lazy %s: only the rows a step touches are updated, with moments of those rows only "
                    "(as torch.optim.SparseAdam)",
                    name,
                    type(optimizer).__name__,
                )
            group["params"] = [p for p in group["params"] if p is not meta]
            optimizer.state.pop(meta, None)
            self.group_of.append(groups[0])
            sharding = HashRowSharding(spec.num_rows, self.num_servers, salt=spec.salt)
            self.tables.append(SparseTable(spec, sharding, row_optimizer, float(group["lr"])))

    # -- training ----------------------------------------------------------------------------------------------------
    def connect(self, client: SparseClient, device: torch.device) -> None:
        """Start the tables on the servers (rank 0: assign initial values) and hook the modules."""
        self.client = client
        self.device = device
        client.start()
        for index, name in enumerate(self.names):
            values = self.initial.pop(name, None)
            if values is not None:
                client.assign(index, values)
        self.initial = {}
        for index, module in enumerate(self.modules.values()):
            hook = partial(self._before_forward, index)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            self._handles.append(module.register_forward_hook(partial(self._after_forward, index)))

    def update_learning_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Each table's ``lr`` from its param group (schedulers change it between steps)."""
        for table, group in zip(self.tables, self.group_of, strict=True):
            table.lr = float(optimizer.param_groups[group]["lr"])

    def _before_forward(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self.client is not None
        ids = args[0] if args else kwargs["input"]
        self.before_pull()
        unique, compact = unique_ids(ids.to("cpu"))
        training = module.training and torch.is_grad_enabled()
        weight = self.client.pull(index, unique, count=training).to(self.device)
        if training:
            weight.requires_grad_(True)
            weight.register_hook(partial(self._record, index, unique))  # type: ignore[no-untyped-call]
        module.weight = weight
        padding = self._padding[self.names[index]]
        if padding is not None:
            position = (unique == padding).nonzero()
            _set_padding(module, int(position[0, 0]) if position.numel() else None)
        compact = compact.to(ids.device)
        if args:
            return (compact, *args[1:]), kwargs
        return args, {**kwargs, "input": compact}

    def _after_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        _set_padding(module, self._padding[self.names[index]])

    def _record(self, index: int, unique: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            grad = grad.coalesce().to_dense()
        self.tables[index].gradients.add(unique, grad.detach().to("cpu"))

    def restore(self, tables: Iterable[tuple[int, torch.Tensor | None]]) -> None:
        """After the fit: remove the hooks; give each module a weight again (gathered values, or a meta tensor).

        A table left on the servers keeps a meta ``weight`` (not a parameter): its rows are in the checkpoints.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        values = dict(tables)
        for index, (name, module) in enumerate(self.modules.items()):
            vars(module).pop("weight", None)
            _set_padding(module, self._padding[name])
            value = values.get(index)
            if value is None:
                # A plain attribute, not a parameter: moving the module skips it, and using it fails on its meta device.
                vars(module)["weight"] = self.meta[name].detach()
            else:
                module._parameters["weight"] = nn.Parameter(
                    value.to(self.device), requires_grad=self.meta[name].requires_grad
                )
