"""Every recipe runs end to end, shortened, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_patterns.cli import main
from lightning_patterns.recipes import list_recipes

# Recipes that need the internet or several machines are documented, not run here.
NOT_RUN_IN_CI = {"fashion_mnist_public"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(list_recipes()) - NOT_RUN_IN_CI))
def test_recipe_runs_shortened(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(list_recipes()[name].read_text())
    overrides = [
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    if "train_samples" in config["data"].get("init_args", {}):
        overrides += ["--data.init_args.train_samples=256", "--data.init_args.val_samples=128"]
    assert main(["fit", "--recipe", name, *overrides]) == 0
    assert "validation accuracy: " in capsys.readouterr().out
