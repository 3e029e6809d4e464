"""Every recipe runs end to end, shortened, through the real command in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_patterns.recipes import best_checkpoint, list_recipes, recipe_root

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
    for embedded in ("embedded", "embedded_click_through"):
        if embedded in init_args:
            overrides += [
                f"--data.init_args.{embedded}.train_samples=2048",
                f"--data.init_args.{embedded}.val_samples=512",
                f"--data.init_args.{embedded}.shard_bytes=262144",
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
    assert re.search(r"validation (accuracy|AUC): ", result.stdout)
    best = tmp_path / best_checkpoint(name)
    assert best.is_file()
    assert (best.parent / "last.ckpt").is_file()
    plots = [c for c in config["trainer"]["callbacks"] if c.get("init_args", {}).get("plot")]
    for callback in plots:
        # The noise-scale callbacks write their plot at the end of fit, under the logger's folder.
        written = list(tmp_path.rglob(callback["init_args"]["plot"]))
        assert written, f"{callback['class_path']} wrote no {callback['init_args']['plot']}"
        assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "Data pipeline" in result.stdout:
        # The closing line and the table come from the same counters, reduced over the ranks; counts are integers.
        closing = result.stdout.split("fit finished: ")[1]
        last_epoch = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+1\s+[0-9,]+\s", line)]
        assert f"data/remote_bytes={int(last_epoch[-1][3].replace(',', ''))}," in closing
        assert re.search(r"data/retries=\d+,", closing)
        per_rank = result.stdout.split("samples per rank in the last epoch: ")[1].splitlines()[0]
        assert f"data/samples={sum(int(n.replace(',', '')) for n in per_rank.split(', '))}," in closing


def test_every_recipe_has_a_description_and_valid_yaml() -> None:
    for name, path in list_recipes().items():
        assert path.read_text().startswith("# "), f"{name} has no one-line description"
        config = yaml.safe_load(path.read_text())
        assert {"trainer", "model", "data"} <= set(config), name


def test_every_recipe_keeps_its_files_where_the_commands_look() -> None:
    """validate --recipe loads recipe_root/checkpoints/best.ckpt, cache info lists recipe_root/cache."""
    for name, path in list_recipes().items():
        config = yaml.safe_load(path.read_text())
        checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert len(checkpoints) == 1, name
        init_args = checkpoints[0]["init_args"]
        assert init_args["dirpath"] == str(best_checkpoint(name).parent), name
        assert (init_args["filename"], init_args["save_last"]) == ("best", True), name
        # The best checkpoint is the one of the highest validation score the model logs.
        assert (init_args["monitor"], init_args["mode"]) in (("val_acc", "max"), ("val_auc", "max")), name
        assert config["trainer"]["default_root_dir"] == str(recipe_root(name)), name
        cache_dir = config["data"].get("init_args", {}).get("cache_dir")
        assert cache_dir in (None, str(recipe_root(name) / "cache")), name
        model = config["model"]["init_args"]
        if "input_shape" in model:  # the image recipes
            assert (model["input_shape"], model["num_classes"]) == ([28, 28], 10), name
