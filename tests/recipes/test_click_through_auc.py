"""The click-through recipe, scaled down, learns to within 0.01 of the generating model's validation AUC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_click_through_recipe_reaches_the_generating_models_auc(tmp_path: Path) -> None:
    # 100 users × 1,000 items and 600k impressions (the recipe has 1,000 × 10,000 and 4M): the same gap in 20 s.
    scaled = [
        "--data.init_args.embedded_click_through.train_samples=600000",
        "--data.init_args.embedded_click_through.val_samples=50000",
        "--data.init_args.embedded_click_through.num_users=100",
        "--data.init_args.embedded_click_through.num_items=1000",
        "--model.init_args.num_embeddings=[100, 1000]",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_patterns",
            "fit",
            "--recipe",
            "click_through",
            *scaled,
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        # Batches of 1,024 small rows gain nothing from intra-op threads, which only oversubscribe a busy machine.
        env={**os.environ, "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "home-cache"), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"validation AUC: ([0-9.]+) \(the generating model's: ([0-9.]+)\)", result.stdout)
    assert found, result.stdout[-2000:]
    learned, generating = float(found[1]), float(found[2])
    assert 0.75 < generating < 0.85, generating  # the data carries signal and noise
    assert learned >= generating - 0.01, (learned, generating)
