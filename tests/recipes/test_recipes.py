"""Every recipe runs end to end, shortened, through the real command in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_patterns.recipes import list_recipes

# Recipes that need the internet are documented, not run here.
NOT_RUN_IN_CI = {"fashion_mnist_public"}


def _shortening(config: dict[str, object], tmp_path: Path) -> list[str]:
    data = config["data"]
    assert isinstance(data, dict)
    init_args = data.get("init_args", {})
    overrides = [
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    if "train_samples" in init_args:
        overrides += ["--data.init_args.train_samples=512", "--data.init_args.val_samples=256"]
    if "embedded" in init_args:
        overrides += [
            "--data.init_args.embedded.train_samples=2048",
            "--data.init_args.embedded.val_samples=512",
            "--data.init_args.embedded.shard_bytes=262144",
        ]
    if init_args.get("cache_dir"):
        overrides.append(f"--data.init_args.cache_dir={tmp_path / 'cache'}")
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(list_recipes()) - NOT_RUN_IN_CI))
def test_recipe_runs_shortened(name: str, tmp_path: Path) -> None:
    config = yaml.safe_load(list_recipes()[name].read_text())
    env = {**os.environ, "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "home-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_patterns", "fit", "--recipe", name, *_shortening(config, tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation accuracy: " in result.stdout


def test_every_recipe_has_a_description_and_valid_yaml() -> None:
    for name, path in list_recipes().items():
        assert path.read_text().startswith("# "), f"{name} has no one-line description"
        config = yaml.safe_load(path.read_text())
        assert {"trainer", "model", "data"} <= set(config), name
