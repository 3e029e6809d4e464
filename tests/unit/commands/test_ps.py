"""``lightning-patterns ps plan``: the cost model's table for a recipe (measured) or a cluster described in flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lightning_patterns.cli import main
from lightning_patterns.commands.ps import parse_bandwidth, parse_bytes, parse_seconds

WHAT_IF = ["--model-bytes", "97MB", "--compute", "110ms", "--optimizer", "25ms", "--server-update", "20ms"]


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (parse_bytes, "97MB", 97e6),
        (parse_bytes, "1.5GiB", 1.5 * 2**30),
        (parse_bytes, "4096", 4096.0),
        (parse_bandwidth, "25Gbps", 25e9 / 8),
        (parse_bandwidth, "3GB/s", 3e9),
        (parse_bandwidth, "600MiB/s", 600 * 2**20),
        (parse_seconds, "110ms", 0.11),
        (parse_seconds, "50us", 50e-6),
        (parse_seconds, "2.5", 2.5),
    ],
)
def test_units_are_read_as_written(parse: object, text: str, value: float) -> None:
    assert parse(text) == pytest.approx(value)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("parse", "text", "match"),
    [
        (parse_bytes, "lots", "'lots' is not a size; write it like 97MB"),
        (parse_bandwidth, "fast", "'fast' is not a bandwidth; write it like 25Gbps"),
        (parse_bandwidth, "25G", "'25G' is not a bandwidth"),
        (parse_seconds, "soon", "'soon' is not a duration; write it like 110ms"),
    ],
)
def test_units_that_cannot_be_read_are_refused_with_an_example(parse: object, text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse(text)  # type: ignore[operator]


def _rows(out: str) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| configuration")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }


def test_a_what_if_plan_sizes_a_cluster_we_do_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ps", "plan", *WHAT_IF, "--workers", "64", "--nodes", "8", "--bandwidth", "25Gbps", "--server-nodes", "4"]
    assert main([*argv, "--max-servers", "8", "--accelerator", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "Cluster: 64 workers on 8 node(s), servers on 4 node(s) of their own" in out
    assert "network 3.12 GB/s" in out
    rows = _rows(out)
    assert list(rows) == ["DDP"] + [f"PS S={s} update_on={p}" for s in range(1, 9) for p in ("worker", "server")]
    # Bytes per worker: the all-reduce's 2·2(n−1)/n·M, the parameter server's push and pull of M.
    assert rows["DDP"][3] == f"{4 * 63 / 64 * 97:.1f}"
    assert rows["PS S=1 update_on=worker"][3] == "194.0"
    # Four server nodes carry the servers' traffic: past S = 4, more servers share the same links.
    step = {label: float(cells[0]) for label, cells in rows.items()}
    assert step["PS S=4 update_on=worker"] < step["PS S=2 update_on=worker"] < step["PS S=1 update_on=worker"]
    recommended = re.search(r"Recommended: (PS S=\d update_on=\w+) \(", out)
    assert recommended is not None
    assert step[recommended.group(1)] == min(v for k, v in step.items() if k != "DDP")


def test_the_plan_says_so_when_ddp_is_predicted_faster(capsys: pytest.CaptureFixture[str]) -> None:
    """64 GPU nodes on a fast network and two servers: each server would carry 32× a worker's traffic."""
    model = ["--model-bytes", "100MB", "--compute", "10ms", "--optimizer", "1ms", "--server-update", "20ms"]
    cluster = ["--workers", "64", "--nodes", "64", "--bandwidth", "100GB/s", "--max-servers", "2"]
    assert main(["ps", "plan", *model, *cluster, "--accelerator", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "DDP is predicted faster" in out
    assert "Prefer DDP, or give the servers nodes or bandwidth of their own" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ps", "plan"], "needs a model: a recipe or config to measure (--recipe NAME, --config FILE"),
        (["ps", "plan", *WHAT_IF, "--workers", "3", "--nodes", "2"], "--workers 3 must be a multiple of --nodes 2"),
        (["ps", "plan", "--model-bytes", "1MB", "--compute", "1ms", "--workers", "0"], "'0' is not an integer >= 1"),
        (["ps", "plan", "--bandwidth", "fast"], "'fast' is not a bandwidth"),
        (["ps", "forecast"], "invalid choice: 'forecast'"),
        (
            ["ps", "plan", *WHAT_IF, "--servers", "2"],
            "unrecognized arguments: --servers. Did you mean `--max-servers`?",
        ),
    ],
)
def test_a_wrong_command_line_says_what_to_write(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors exit; ours return the status
        code = exit_.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_recipe_is_measured_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = ["--data.init_args.train_samples=2048", "--data.init_args.val_samples=64", "--trainer.devices=2"]
    assert main(["ps", "plan", "--recipe", "fashion_mnist_in_memory", *overrides, "--max-servers", "2"]) == 0
    out = capsys.readouterr().out
    # MLPClassifier(hidden_dim=128) on 28×28 inputs, 10 classes: 784 → 128 → 128 → 10, float32.
    params = 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert f"Model: {params * 4 / 1e6:.1f} MB of gradients" in out
    assert "Cluster: 2 workers on 1 node(s)" in out
    assert list(_rows(out)) == ["DDP", *(f"PS S={s} update_on={p}" for s in (1, 2) for p in ("worker", "server"))]
    assert "Recommended: PS S=" in out
