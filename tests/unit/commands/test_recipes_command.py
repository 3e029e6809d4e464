"""``lightning-patterns recipes``: every recipe with its description, and which ones have a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_patterns.cli import main
from lightning_patterns.recipes import best_checkpoint, list_recipes


def test_recipes_lists_every_recipe_and_marks_trained_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    trained = best_checkpoint("fashion_mnist")
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert set(list_recipes()) >= {"fashion_mnist"}
    for name in list_recipes():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        mark, description = line[len(name) :].split(None, 1) if name == "fashion_mnist" else ("", line[len(name) :])
        assert mark == ("*" if name == "fashion_mnist" else "")
        assert len(description.strip()) > 10, f"recipe {name} has no description"


def test_no_recipes_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIGHTNING_PATTERNS_RECIPES", str(tmp_path))
    assert main(["recipes"]) == 1
    assert f"No recipes found in {tmp_path}." in capsys.readouterr().out
