"""Every public module declares a sorted ``__all__`` of names it really has; only `_lightning` imports Lightning."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lightning_patterns

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_patterns.__path__, "lightning_patterns.")
    if not any(part.startswith("_") for part in info.name.split(".")) and not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


_LIGHTNING_MODULES = ("lightning", "pytorch_lightning", "lightning_fabric")


def _runtime_lightning_imports(path: Path) -> list[str]:
    """Lightning imports of ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(child) for statement in node.body for child in ast.walk(statement))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in _LIGHTNING_MODULES]
    return found


def test_only_the_compatibility_module_imports_lightning_at_run_time() -> None:
    """Every class of either Lightning package is reached through `_lightning`, so both packages work."""
    package = Path(lightning_patterns.__file__).parent
    offenders = [
        found
        for path in sorted(package.rglob("*.py"))
        if path.name != "_lightning.py"
        for found in _runtime_lightning_imports(path)
    ]
    assert not offenders, f"import Lightning through lightning_patterns._lightning instead: {offenders}"
