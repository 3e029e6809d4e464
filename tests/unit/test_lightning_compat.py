"""Both Lightning packages: each Trainer gets classes of its own tree; Lightning internals checked in one place."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_patterns import _lightning
from lightning_patterns.data.shards import write_dataset

_BASES = {
    "CNNClassifier": "LightningModule",
    "DataMetricsCallback": "Callback",
    "IDXDataModule": "LightningDataModule",
    "ImageClassifier": "LightningModule",
    "InMemoryDataModule": "LightningDataModule",
    "MLPClassifier": "LightningModule",
    "ShardedStreamingDataModule": "LightningDataModule",
}


def test_every_lightning_internal_we_use_exists(lightning_package: Any) -> None:
    """Fails, naming what changed, on a Lightning release that renamed or removed one of them."""
    tree = _lightning.tree(lightning_package.name)
    assert _lightning.check_internals(tree) == [], f"{tree.root} {tree.version} changed these internals"
    for spec in _lightning.INTERNALS:
        assert _lightning.internal(tree, spec) is not None


def test_a_changed_internal_fails_with_the_version_and_a_fix(
    lightning_package: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = _lightning.tree(lightning_package.name)
    # What a Lightning release that renamed the launcher would look like.
    monkeypatch.delattr(tree.module("strategies.launchers"), "_SubprocessScriptLauncher")
    with pytest.raises(_lightning.LightningInternalsError) as error:
        _lightning.internal(tree, "pl:strategies.launchers:_SubprocessScriptLauncher")
    message = str(error.value)
    assert "strategies.launchers._SubprocessScriptLauncher" in message
    assert f"{tree.root} {tree.version}" in message
    assert ">=2.6,<2.7" in message
    assert "pl:strategies.launchers:_SubprocessScriptLauncher" in _lightning.check_internals(tree)
    with pytest.raises(_lightning.LightningInternalsError, match=r"Precision\._wrap_closure"):
        _lightning.wrap_closure(tree, object(), None, None, lambda: None)
    with pytest.raises(_lightning.LightningInternalsError, match=r"ParallelStrategy\._layer_sync"):
        _lightning.layer_sync(tree, object())
    with pytest.raises(ValueError, match="list every Lightning internal there"):
        _lightning.internal(tree, "pl:trainer:_not_listed")


@pytest.mark.parametrize("name", sorted(_BASES))
def test_public_classes_belong_to_the_tree_of_their_package(lightning_package: Any, name: str) -> None:
    cls = getattr(lightning_package.classes, name)
    assert issubclass(cls, getattr(lightning_package.pl, _BASES[name]))
    assert cls.__module__ == f"lightning_patterns.{lightning_package.name}"
    assert cls.__doc__  # LightningCLI's help reads it
    assert pickle.loads(pickle.dumps(cls)) is cls  # spawned processes find it by name
    assert getattr(lightning_package.classes, name) is cls  # built once


def test_strategy_belongs_to_the_tree_of_its_package(lightning_package: Any) -> None:
    strategy = lightning_package.classes.ParameterServerStrategy(num_servers=2)
    assert isinstance(strategy, lightning_package.pl.strategies.ParallelStrategy)
    assert pickle.loads(pickle.dumps(strategy)).num_servers == 2


def test_unknown_and_missing_packages_are_named() -> None:
    with pytest.raises(ValueError, match="Unknown Lightning package 'lightning_fabric'"):
        _lightning.tree("lightning_fabric")
    with pytest.raises(AttributeError):
        _lightning.built_class("NoSuchClass")


def _python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plain_names_follow_the_package_the_script_imported() -> None:
    """`import lightning as L` first: our plain names give `lightning.pytorch` classes, and the name is registered."""
    out = _python(
        """
        import sys
        import lightning_patterns
        import lightning_patterns.data
        assert not {"torch", "lightning", "pytorch_lightning"} & set(sys.modules), "importing us imported them"
        import lightning as L
        from lightning_patterns.data import ShardedStreamingDataModule
        from lightning_patterns.strategies import ParameterServerStrategy
        assert issubclass(ShardedStreamingDataModule, L.LightningDataModule)
        trainer = L.Trainer(strategy="parameter_server", accelerator="cpu", devices=2, logger=False)
        assert isinstance(trainer.strategy, ParameterServerStrategy)
        assert "pytorch_lightning" not in sys.modules
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_with_nothing_imported_the_default_is_pytorch_lightning_unless_the_variable_says() -> None:
    code = """
        from lightning_patterns.callbacks import DataMetricsCallback
        print(DataMetricsCallback.__module__)
        """
    assert _python(code).strip() == "lightning_patterns.pytorch_lightning"
    assert _python(code, {_lightning.PACKAGE_ENV: "lightning"}).strip() == "lightning_patterns.lightning"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, _lightning.PACKAGE_ENV: "tensorflow"},
    )
    assert result.returncode != 0
    assert "LIGHTNING_PATTERNS_LIGHTNING='tensorflow' is not a Lightning package" in result.stderr


class _Images:
    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": np.full((28, 28), i % 256, dtype=np.uint8), "label": np.int64(i % 10)}


def test_streaming_datamodule_callback_and_model_train_under_each_package(
    lightning_package: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One fit and one mid-run checkpoint with our DataModule, callback and example model on the package's Trainer."""
    train = str(tmp_path / "train")
    write_dataset(_Images(), train, num_shards=3, progress=False)
    classes, pl = lightning_package.classes, lightning_package.pl
    data = classes.ShardedStreamingDataModule(train_url=train, val_url=train, batch_size=16, cache="memory")
    callback = classes.DataMetricsCallback()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, checkpoint],
        default_root_dir=tmp_path,
    )
    trainer.fit(classes.MLPClassifier(hidden_dim=8), datamodule=data)
    assert trainer.global_step == 2 * 6
    assert [m.samples for m in callback.epochs] == [96, 96]
    assert callback.epochs[1].remote_bytes == 0  # epoch 2 read the memory cache
    assert "Data pipeline" in capsys.readouterr().out
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # Saved under the class's qualified name, the same in both packages: checkpoints move between them.
    assert saved["ShardedStreamingDataModule"]["train"]["lightning_patterns"]["epoch"] == 1
