"""Every public module declares a sorted ``__all__`` of names it really has; Lightning only as pytorch_lightning."""

from __future__ import annotations

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


def test_lightning_is_imported_only_as_pytorch_lightning() -> None:
    package = Path(lightning_patterns.__file__).parent
    offenders = [
        str(path)
        for path in package.rglob("*.py")
        if any(
            line.strip().startswith(("import lightning", "from lightning ", "from lightning."))
            and not line.strip().startswith(("import lightning_", "from lightning_"))
            for line in path.read_text().splitlines()
        )
    ]
    assert not offenders
