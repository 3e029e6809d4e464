"""The one module that imports Lightning, for both of its packages.

Lightning ships the same code as two packages with separate class trees: ``lightning.pytorch`` (in the
``lightning`` distribution) and ``pytorch_lightning``. A Trainer of one tree rejects the strategies,
DataModules, callbacks and modules of the other (its ``isinstance`` checks fail), and each tree has its
own strategy registry. So every Lightning-facing class of ours is written once, as a *body* that names
no Lightning class at run time, and built for a tree on first use::

    class _DataMetricsCallback(CallbackBase):   # CallbackBase: a Lightning class for type checkers only
        ...                                       # Lightning things at run time come from `self._lp_tree`

    DataMetricsCallback = built for "pytorch_lightning" → class (_DataMetricsCallback, pytorch_lightning.Callback)
                          built for "lightning"         → class (_DataMetricsCallback, lightning.pytorch.Callback)

The built classes live in :mod:`lightning_patterns.pytorch_lightning` and :mod:`lightning_patterns.lightning`
(so they pickle by name, as spawned processes need). The plain names used everywhere else
(``lightning_patterns.strategies.ParameterServerStrategy``, ``lightning_patterns.data.ShardedStreamingDataModule``,
recipe ``class_path`` values) give the class of the *active* package, decided at each lookup by
:func:`active_package`. ``strategy="parameter_server"`` is registered in the registry of each tree, when that
tree is imported (before or after ``lightning_patterns``).

Lightning internals we rely on (private names that may change between releases) are reached only through
:func:`internal` and the small wrappers at the end of this module, which fail with one clear message naming the
Lightning version instead of an ``AttributeError`` deep inside training; ``tests/unit/test_lightning_compat.py``
checks every one of them on both packages.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "CLASSES",
    "PACKAGES",
    "PACKAGE_ENV",
    "LightningInternalsError",
    "LightningNotInstalledError",
    "Tree",
    "active_package",
    "build",
    "built_class",
    "check_internals",
    "class_getter",
    "installed_packages",
    "internal",
    "register_strategies",
    "tree",
]

#: Our short name of each package → the module of its trainer tree and of its Fabric tree.
PACKAGES: dict[str, tuple[str, str]] = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
    "lightning": ("lightning.pytorch", "lightning.fabric"),
}
#: Forces the package the plain names resolve to: ``lightning`` or ``pytorch_lightning``.
PACKAGE_ENV = "LIGHTNING_PATTERNS_LIGHTNING"


class LightningNotInstalledError(ModuleNotFoundError):
    """Neither Lightning package (or not the one asked for) is installed."""


class LightningInternalsError(RuntimeError):
    """A private Lightning name we rely on is missing: this Lightning release changed it."""


@dataclass(frozen=True)
class Tree:
    """One Lightning package: its trainer modules (``tree.pl``, :meth:`module`) and Fabric modules (:meth:`fabric`).

    Attributes:
        name: ``"pytorch_lightning"`` or ``"lightning"``.
    """

    name: str

    @property
    def root(self) -> str:
        """Module name of the trainer tree: ``pytorch_lightning`` or ``lightning.pytorch``."""
        return PACKAGES[self.name][0]

    @property
    def pl(self) -> Any:
        """The trainer tree's top module (``Trainer``, ``LightningModule``, ``Callback``, ...)."""
        return self.module("")

    def module(self, suffix: str) -> Any:
        """The trainer-tree module ``<root>.<suffix>`` (``suffix=""``: the root)."""
        return importlib.import_module(f"{self.root}.{suffix}" if suffix else self.root)

    def fabric(self, suffix: str) -> Any:
        """The Fabric-tree module ``<lightning_fabric or lightning.fabric>.<suffix>``."""
        return importlib.import_module(f"{PACKAGES[self.name][1]}.{suffix}")

    @property
    def version(self) -> str:
        """The package's version."""
        return str(self.pl.__version__)


def tree(name: str) -> Tree:
    """The :class:`Tree` of package ``name``; raises when it is unknown or not installed."""
    if name not in PACKAGES:
        raise ValueError(f"Unknown Lightning package {name!r}. Expected one of: {', '.join(sorted(PACKAGES))}.")
    if name not in installed_packages():
        raise LightningNotInstalledError(
            f"The Lightning package {name!r} is not installed. Install it with `pip install {_distribution(name)}`, "
            f"or use the one that is installed ({', '.join(installed_packages()) or 'none'})."
        )
    return Tree(name)


def _distribution(name: str) -> str:
    return "pytorch-lightning" if name == "pytorch_lightning" else "lightning"


@functools.cache
def installed_packages() -> tuple[str, ...]:
    """The Lightning packages installed here, found without importing them (or torch)."""
    found = []
    for name, (root, _) in PACKAGES.items():
        top, _, sub = root.partition(".")
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        # `find_spec("lightning.pytorch")` would import `lightning`: look for the subpackage's folder instead.
        folders = spec.submodule_search_locations or ()
        if sub and not any(os.path.isdir(os.path.join(folder, sub)) for folder in folders):
            continue
        found.append(name)
    return tuple(found)


def active_package() -> str:
    """The package the plain names resolve to, decided at each lookup.

    In order: ``$LIGHTNING_PATTERNS_LIGHTNING``; else the one package already imported in this process (a script
    that did ``import lightning as L`` gets ``lightning.pytorch`` classes); else ``pytorch_lightning`` if installed
    (our base dependency, and what a script importing ``pytorch_lightning`` after us needs), else ``lightning``.
    With both imported, use the explicit modules :mod:`lightning_patterns.lightning` /
    :mod:`lightning_patterns.pytorch_lightning`, or set the variable.
    """
    forced = os.environ.get(PACKAGE_ENV, "").strip()
    if forced:
        if forced not in PACKAGES:
            raise ValueError(
                f"{PACKAGE_ENV}={forced!r} is not a Lightning package. Expected one of: {', '.join(sorted(PACKAGES))}."
            )
        return tree(forced).name
    imported = [name for name, (root, _) in PACKAGES.items() if root in sys.modules]
    if len(imported) == 1:
        return imported[0]
    available = installed_packages()
    if not available:
        raise LightningNotInstalledError(
            "lightning_patterns' Trainer parts need Lightning: `pip install lightning` or "
            "`pip install pytorch-lightning`."
        )
    return "pytorch_lightning" if "pytorch_lightning" in available else available[0]


# -- building classes per tree ---------------------------------------------------------------------------------------
#: Public name → (``module:attribute`` of the body, trainer-tree module suffix and name of the Lightning base).
CLASSES: dict[str, tuple[str, str, str]] = {
    "AdaptiveBatchSize": ("lightning_patterns.adaptive.callbacks:_AdaptiveBatchSize", "", "Callback"),
    "CNNClassifier": ("lightning_patterns.models:_CNNClassifier", "", "LightningModule"),
    "DataMetricsCallback": ("lightning_patterns.callbacks:_DataMetricsCallback", "", "Callback"),
    "EmbeddingCTR": ("lightning_patterns.ctr:_EmbeddingCTR", "", "LightningModule"),
    "GradientNoiseScale": ("lightning_patterns.adaptive.callbacks:_GradientNoiseScale", "", "Callback"),
    "IDXDataModule": ("lightning_patterns.data.idx_datamodule:_IDXDataModule", "", "LightningDataModule"),
    "ImageClassifier": ("lightning_patterns.models:_ImageClassifier", "", "LightningModule"),
    "InMemoryDataModule": ("lightning_patterns.data.in_memory:_InMemoryDataModule", "", "LightningDataModule"),
    "LightningPatternsCLI": ("lightning_patterns.commands.fit:_LightningPatternsCLI", "cli", "LightningCLI"),
    "MLPClassifier": ("lightning_patterns.models:_MLPClassifier", "", "LightningModule"),
    "ParameterServerStrategy": (
        "lightning_patterns.strategies.parameter_server.strategy:_ParameterServerStrategy",
        "strategies",
        "ParallelStrategy",
    ),
    "ShardedStreamingDataModule": (
        "lightning_patterns.data.datamodule:_ShardedStreamingDataModule",
        "",
        "LightningDataModule",
    ),
    "TinyRegressor": ("lightning_patterns.testing.tiny_job:_TinyRegressor", "", "LightningModule"),
}

_BUILD_LOCK = threading.RLock()
_BUILT: dict[tuple[str, str], type] = {}


def _import_attribute(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def build(body: type, lightning_base: type, package: str, name: str) -> type:
    """The class ``name`` of ``package``: ``body`` first in the MRO, then the Lightning base of that tree.

    The class is given the module of its package (:mod:`lightning_patterns.lightning` or
    :mod:`lightning_patterns.pytorch_lightning`), where it is found by name when pickled.
    """
    namespace = {
        "__module__": f"lightning_patterns.{package}",
        "__qualname__": name,
        "__doc__": body.__doc__,
        "_lp_tree": Tree(package),
    }
    return type(name, (body, lightning_base), namespace)


def built_class(name: str, package: str | None = None) -> type:
    """The public class ``name`` (a key of :data:`CLASSES`) built for ``package`` (default: the active one)."""
    if name not in CLASSES:
        raise AttributeError(name)
    package = tree(package or active_package()).name
    key = (package, name)
    with _BUILD_LOCK:
        if key not in _BUILT:
            body_path, base_module, base_name = CLASSES[name]
            body = _import_attribute(body_path)
            base = getattr(Tree(package).module(base_module), base_name)
            # Importing the base may have imported Lightning's strategies, whose import hook (below) built this
            # class already: keep that one, the registry holds it.
            if key not in _BUILT:
                _BUILT[key] = build(body, base, package, name)
        return _BUILT[key]


def class_getter(module: str, names: Sequence[str], package: str | None = None) -> Callable[[str], type]:
    """Module ``module``'s ``__getattr__``: its public classes ``names`` for ``package`` (default: the active one)."""
    known = frozenset(names)

    def __getattr__(attribute: str) -> type:
        if attribute not in known:
            raise AttributeError(f"module {module!r} has no attribute {attribute!r}")
        return built_class(attribute, package)

    return __getattr__


# -- strategy registration -------------------------------------------------------------------------------------------
_STRATEGY_NAMES = {
    "parameter_server": ("Parameter servers, synchronous (`ParameterServerStrategy`)", {}),
    "parameter_server_async": (
        "Parameter servers, fully asynchronous (`ParameterServerStrategy(update_on='server', mode='async')`)",
        {"update_on": "server", "mode": "async", "max_staleness": None},
    ),
}


def register_strategies(package: str) -> None:
    """Register ``"parameter_server"`` and ``"parameter_server_async"`` in ``package``'s strategy registry."""
    registry = Tree(package).module("strategies").StrategyRegistry
    strategy = built_class("ParameterServerStrategy", package)
    for name, (description, init_params) in _STRATEGY_NAMES.items():
        if name not in registry:
            registry.register(name, strategy, description=description, **init_params)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers our strategies in a Lightning tree's registry as soon as its ``strategies`` package is imported.

    ``import lightning_patterns`` must not import Lightning (DataLoader workers import us too), yet
    ``Trainer(strategy="parameter_server")`` must work whichever of the two is imported first.
    """

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = modules  # "<root>.strategies" -> package

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package = self.modules.get(fullname)
        if package is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            self.modules.pop(fullname, None)
            register_strategies(package)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_when_imported() -> None:
    """Register our strategies with every Lightning tree: now for imported ones, on import for the others."""
    pending: dict[str, str] = {}
    for package in installed_packages():
        module = f"{PACKAGES[package][0]}.strategies"
        if module in sys.modules:
            register_strategies(package)
        else:
            pending[module] = package
    if pending and not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(pending))


# -- Lightning internals, in one place -------------------------------------------------------------------------------
#: Private names of Lightning we use: ``"fabric:"`` or ``"pl:"`` + ``module:attribute``.
INTERNALS = (
    "pl:strategies.launchers:_SubprocessScriptLauncher",
    "pl:strategies.launchers:_MultiProcessingLauncher",
    "fabric:strategies.registry:_StrategyRegistry",
    "fabric:utilities.distributed:_all_gather_ddp_if_available",
    "fabric:utilities.distributed:_distributed_is_initialized",
    "fabric:utilities.distributed:_get_default_process_group_backend_for_device",
    "fabric:utilities.distributed:_init_dist_connection",
    "fabric:utilities.distributed:_sync_ddp_if_available",
    "fabric:utilities.optimizer:_optimizers_to_device",
)
#: Private attributes of Lightning objects we use: ``"pl:" module:class`` → attribute.
INTERNAL_ATTRIBUTES = (
    ("pl:plugins.precision:Precision", "_wrap_closure"),
    ("pl:loops.training_epoch_loop:_TrainingEpochLoop", "_broadcast_sigterm_tensor"),
)
#: Private attributes a Lightning class sets on its instances in ``__init__``: ``"pl:" module:class`` → attribute.
INTERNAL_INSTANCE_ATTRIBUTES = (("pl:strategies:ParallelStrategy", "_layer_sync"),)


def _resolve(lightning: Tree, spec: str) -> Any:
    side, _, rest = spec.partition(":")
    module_suffix, _, attribute = rest.partition(":")
    module = lightning.fabric(module_suffix) if side == "fabric" else lightning.module(module_suffix)
    return getattr(module, attribute)


def _changed(lightning: Tree, what: str, error: BaseException | None = None) -> LightningInternalsError:
    return LightningInternalsError(
        f"lightning_patterns needs `{what}` of {lightning.root} {lightning.version}, which this release does not "
        f"have{f' ({error})' if error else ''}. lightning_patterns is tested with Lightning 2.6; install "
        f"`{_distribution(lightning.name)}>=2.6,<2.7` or a lightning_patterns release made for your Lightning."
    )


def internal(lightning: Tree, spec: str) -> Any:
    """The private Lightning name ``spec`` (one of :data:`INTERNALS`) of tree ``lightning``, or a clear error."""
    if spec not in INTERNALS:
        raise ValueError(f"{spec!r} is not listed in INTERNALS; list every Lightning internal there.")
    try:
        return _resolve(lightning, spec)
    except (ImportError, AttributeError) as error:
        raise _changed(lightning, spec.split(":", 1)[1].replace(":", "."), error) from error


def _assigned_in_init(cls: type, attribute: str) -> bool:
    # An attribute `__init__` assigns is among the names its code object stores.
    return attribute in cls.__init__.__code__.co_names  # type: ignore[misc]


def check_internals(lightning: Tree) -> list[str]:
    """Every internal of :data:`INTERNALS` and :data:`INTERNAL_ATTRIBUTES` that ``lightning`` lacks (``[]``: none)."""
    missing = []
    for spec in INTERNALS:
        try:
            _resolve(lightning, spec)
        except (ImportError, AttributeError):
            missing.append(spec)
    checks: list[tuple[str, str, Callable[[type, str], bool]]]
    checks = [(owner, attribute, hasattr) for owner, attribute in INTERNAL_ATTRIBUTES]
    checks += [(owner, attribute, _assigned_in_init) for owner, attribute in INTERNAL_INSTANCE_ATTRIBUTES]
    for owner, attribute, has in checks:
        try:
            cls = _resolve(lightning, owner)
        except (ImportError, AttributeError):
            missing.append(owner)
            continue
        if not has(cls, attribute):
            missing.append(f"{owner}.{attribute}")
    return missing


def wrap_closure(lightning: Tree, precision: Any, model: Any, optimizer: Any, closure: Callable[[], Any]) -> Any:
    """``Precision._wrap_closure``: run the closure, ``on_before_optimizer_step`` and gradient clipping."""
    method = getattr(precision, "_wrap_closure", None)
    if method is None:
        raise _changed(lightning, "Precision._wrap_closure")
    return method(model, optimizer, closure)


def replace_sigterm_broadcast(lightning: Tree, loop: Any, check: Callable[[], None]) -> None:
    """Replace the training loop's per-batch SIGTERM broadcast from rank 0 with a local ``check``."""
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        raise _changed(lightning, "_TrainingEpochLoop._broadcast_sigterm_tensor")
    loop._broadcast_sigterm_tensor = check


def layer_sync(lightning: Tree, strategy: Any) -> Any:
    """``ParallelStrategy._layer_sync``: the ``LayerSync`` plugin of ``Trainer(sync_batchnorm=True)``, or ``None``."""
    if not hasattr(strategy, "_layer_sync"):
        raise _changed(lightning, "ParallelStrategy._layer_sync")
    return strategy._layer_sync


def mark_optimizer_stepped(optimizer: Any) -> None:
    """Record that ``optimizer.step`` ran, as torch's LR-scheduler wrapper of ``step`` does (schedulers check it)."""
    optimizer._opt_called = True
