"""ARCHITECTURE.md stays true: it names every folder of the package and of the repository's other trees, every
module file it names exists, and ``tests/unit/`` mirrors the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_patterns"
TEXT = (ROOT / "ARCHITECTURE.md").read_text()


def _folders(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.is_dir() and not p.name.startswith((".", "_")))


def _named(path: str) -> bool:
    return re.search(rf"`{re.escape(path)}/?`", TEXT) is not None


def test_every_package_folder_has_its_line() -> None:
    packages = [p for p in _folders(PACKAGE) if (p / "__init__.py").is_file()]
    assert len(packages) > 10
    missing = [str(p.relative_to(PACKAGE)) for p in packages if not _named(f"{p.relative_to(PACKAGE)}/")]
    assert missing == [], f"ARCHITECTURE.md has no line for lightning_patterns/{missing}: add one per folder"


def test_every_folder_of_tests_benchmarks_recipes_examples_is_named() -> None:
    tops = [ROOT / name for name in ("tests", "benchmarks", "recipes", "examples")]
    assert all(f"`{top.name}/" in TEXT for top in tops), (
        "ARCHITECTURE.md names tests/, benchmarks/, recipes/, examples/"
    )
    # One level down in tests/ (unit/, property/, ...): a second level mirrors the package and needs no line.
    missing = [
        f"tests/{p.name}/"
        for p in (ROOT / "tests").iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and not _named(f"tests/{p.name}/")
    ]
    assert missing == [], f"ARCHITECTURE.md has no line for {missing}"


def test_every_module_file_it_names_exists() -> None:
    named = set(re.findall(r"\b([\w/]+\.py)\b", TEXT))
    assert named
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    stale = [name for name in named if not any(f == name or f.endswith("/" + name) for f in files)]
    assert stale == [], f"ARCHITECTURE.md names modules that do not exist: {sorted(stale)}"


def test_unit_tests_mirror_the_package() -> None:
    unit = ROOT / "tests" / "unit"
    strays = [str(p.relative_to(unit)) for p in _folders(unit) if not (PACKAGE / p.relative_to(unit)).is_dir()]
    assert strays == [], f"tests/unit/{strays} mirror no folder of lightning_patterns/: move them to the module's place"
