"""`lightning_patterns.testing` stays light (its plugin is loaded by every pytest run), and without Hypothesis the
strategies and `shards check` say which extra to install. One interpreter, started once, checks all of it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from lightning_patterns.data.shards import Manifest, Schema, ShardInfo, publish_manifest

_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    HEAVY = {"torch", "lightning", "pytorch_lightning", "hypothesis"}
    def loaded():
        return sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None} & HEAVY)
    report = {}
    import lightning_patterns.testing.pytest_plugin
    report["plugin"] = loaded()
    from lightning_patterns.testing import JobTopology, check_balance
    report["balance"] = loaded()
    report["ok"] = check_balance(sys.argv[1], JobTopology(world_size=3, num_workers=2)).ok
    sys.modules["hypothesis"] = None  # as if Hypothesis were not installed
    try:
        from lightning_patterns.testing import strategies
    except ImportError as err:
        report["strategies"] = str(err)
    from lightning_patterns.commands.shards import run_shards_command
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report["check"] = [run_shards_command(["check", sys.argv[1]]), err.getvalue()]
    report["after"] = loaded()
    print(json.dumps(report))
    """
)


def test_testing_is_light_and_hypothesis_is_optional(tmp_path: Path) -> None:
    shards = tuple(ShardInfo(f"s{i}.lps", 10, 4096, "sha256:" + "0" * 64) for i in range(3))
    publish_manifest(Manifest(Schema.infer({"x": 1}), shards, {"rule": "size", "shard_bytes": 4096}), str(tmp_path))
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(probe.stdout)
    assert report["plugin"] == [], f"the pytest plugin imports {report['plugin']} when pytest starts"
    assert report["balance"] == [], f"check_balance imports {report['balance']}"
    assert report["ok"] is True
    assert "lightning_patterns.testing.strategies needs Hypothesis" in report["strategies"]
    assert "`pip install lightning-patterns[test]`" in report["strategies"]
    code, err = report["check"]
    assert code == 1
    assert "lightning-patterns shards check: error: it searches with Hypothesis, which is not installed" in err
    assert "`pip install lightning-patterns[test]`" in err
    assert report["after"] == []
