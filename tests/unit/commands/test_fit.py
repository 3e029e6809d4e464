from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_patterns.cli import main
from lightning_patterns.recipes import UnknownRecipeError, find_recipe, list_recipes

SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
# The default recipe streams its embedded dataset: make it small.
SMALL_DATA = [
    "--data.init_args.embedded.train_samples=256",
    "--data.init_args.embedded.val_samples=64",
    "--data.init_args.batch_size=32",
]


def test_recipes_lists_every_recipe_with_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert set(list_recipes()) >= {"fashion_mnist"}
    for name in list_recipes():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10, f"recipe {name} has no description"


def test_unknown_recipe_lists_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "Unknown recipe 'no_such_recipe'" in err
    assert "fashion_mnist" in err


def test_find_recipe_raises_with_valid_names() -> None:
    with pytest.raises(UnknownRecipeError, match=r"Valid recipes: .*fashion_mnist"):
        find_recipe("nope")


def test_recipe_flag_without_a_name_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe"]) == 2
    assert "`--recipe` needs a name" in capsys.readouterr().err


def test_wrong_key_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--recipe", "fashion_mnist", "--trainer.max_epoch=3"])
    assert exit_info.value.code != 0
    assert "max_epoch" in capsys.readouterr().err


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--recipe", "fashion_mnist", "--trainer.max_epochs=three"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "max_epochs" in err
    assert "three" in err


def test_wrong_key_in_a_config_file_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(find_recipe("fashion_mnist").read_text() + "\nnot_a_key: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    assert "not_a_key" in capsys.readouterr().err


def test_fit_overrides_from_the_command_line_and_prints_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_PATTERNS_CACHE", str(tmp_path / "cache"))
    code = main(["fit", "--recipe", "fashion_mnist", f"--trainer.default_root_dir={tmp_path}", *SHORT_RUN, *SMALL_DATA])
    assert code == 0
    out = capsys.readouterr().out
    assert "validation accuracy: " in out
    accuracy = float(out.split("validation accuracy: ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lightning-patterns"
    listed = subprocess.run([str(script), "recipes"], capture_output=True, text=True, timeout=120, check=True)
    assert "fashion_mnist" in listed.stdout
    fitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_patterns",
            "validate",
            "--recipe",
            "fashion_mnist",
            *SHORT_RUN[2:],
            *SMALL_DATA,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "cache")},
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert "validation accuracy: " in fitted.stdout
