"""The README's snippets run as written, and every command it names exists.

Each ```python block is saved as a script and run against real test servers on 127.0.0.1: the S3 snippets reach a
moto server through ``AWS_ENDPOINT_URL`` (what the README tells a user with a local S3-compatible server to set),
and the one HTTP snippet's public base URL is replaced by the project's HTTP test server serving IDX files of the
same names. To keep the suite fast, the snippets of the data path alone (no Lightning) run in README order in one
interpreter (each as ``__main__`` in a fresh namespace; the Streaming one reads what the Sharding one wrote, as a
reader's would), the ``pytest`` files in one ``pytest`` run, and each snippet that uses Lightning in a process of
its own, as a user runs it: which Lightning package our classes take is decided by what the process imported.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.testing import moto_s3_server
from lightning_patterns.testing.http_server import serve_directory

pytestmark = [pytest.mark.slow, pytest.mark.remote]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
IDX_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
GUARD = 'if __name__ == "__main__":'
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    return [body for lang, body in _FENCE.findall(README.read_text()) if lang == language]


@dataclass(frozen=True)
class Snippet:
    index: int
    source: str

    @property
    def is_test_file(self) -> bool:
        return re.search(r"^def test_", self.source, re.MULTILINE) is not None

    @property
    def uses_lightning(self) -> bool:
        return re.search(r"^import (lightning|pytorch_lightning)\b", self.source, re.MULTILINE) is not None

    def name(self) -> str:
        return f"test_readme_{self.index}.py" if self.is_test_file else f"readme_{self.index}.py"


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fashion_like(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return [{"image": images[i], "label": np.int64(i % 10)} for i in range(n)]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# Runs each script given as ``__main__`` in a fresh namespace, in order; the first failure fails the run.
_RUN_IN_ORDER = textwrap.dedent(
    """
    import runpy, sys
    for path in sys.argv[1:]:
        print(f"--- {path}", flush=True)
        runpy.run_path(path, run_name="__main__")
    """
)


@dataclass(frozen=True)
class Servers:
    env: dict[str, str]  # the environment the snippets run in: AWS_ENDPOINT_URL and dummy credentials for moto
    idx_base: str  # the HTTP server's URL of a folder with the Fashion-MNIST IDX file names


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A moto S3 server holding ``s3://bucket/train`` and ``/val``, and an HTTP server with Fashion-MNIST IDX names."""
    idx_root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    n = 600
    (idx_root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(rng.integers(0, 256, (n, 28, 28)))))
    (idx_root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(rng.integers(0, 10, n))))
    with moto_s3_server() as s3, serve_directory(idx_root) as http:
        root = s3.create_bucket("bucket")
        for split, samples, seed in (("train", 1024, 1), ("val", 256, 2)):
            url = f"{root}/{split}"
            write_dataset(_fashion_like(samples, seed), url, shard_bytes=64 * 2**10, storage_options=s3.storage_options)
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3.storage_options["key"],
            "AWS_SECRET_ACCESS_KEY": s3.storage_options["secret"],
            "AWS_DEFAULT_REGION": s3.region,
            "LIGHTNING_PATTERNS_CACHE": str(tmp_path_factory.mktemp("user_cache")),
        }
        yield Servers(env=env, idx_base=http.url_for("").rstrip("/"))


def test_every_python_snippet_runs_as_written(servers: Servers, tmp_path: Path) -> None:
    snippets = [Snippet(i, source) for i, source in enumerate(blocks("python"))]
    assert len(snippets) >= 8, "the README's Python blocks were not found: is the fence still ```python?"
    [idx] = [s for s in snippets if IDX_BASE in s.source]
    for snippet in snippets:
        source = snippet.source
        if snippet is idx:  # the one public URL: the same file names, served from 127.0.0.1
            source = source.replace(IDX_BASE, servers.idx_base)
        (tmp_path / snippet.name()).write_text(source)
        # Complete scripts: whatever a script uses it imports (no `pl.`/`L.` without its import).
        for alias, module in (("L", "lightning"), ("pl", "pytorch_lightning")):
            if re.search(rf"\b{alias}\.\w", source):
                assert f"import {module} as {alias}" in source, f"README block {snippet.index} uses {alias}. unimported"

    data_path = [s.name() for s in snippets if not s.is_test_file and not s.uses_lightning]
    out = _run([sys.executable, "-c", _RUN_IN_ORDER, *data_path], tmp_path, servers.env, timeout=300)
    assert (tmp_path / "lp_cache").is_dir(), "the caching snippet's disk cache was not written in the folder it names"
    assert "epoch 1: 0 bytes from the remote" in out, f"the caching snippet's second epoch read the remote:\n{out}"

    tests = [s.name() for s in snippets if s.is_test_file]
    assert tests, "the README's test files (Property-testing your data) were not found"
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *tests]
    _run(pytest_argv, tmp_path, servers.env, timeout=300)

    for snippet in (s for s in snippets if s.uses_lightning):
        out = _run([sys.executable, snippet.name()], tmp_path, servers.env, timeout=300)
        if snippet is idx:
            assert "torch.Size([256, 28, 28])" in out, f"the IDX snippet printed another shape than it says:\n{out}"


def test_processes_are_started_only_under_the_main_guard() -> None:
    for index, source in enumerate(blocks("python")):
        if re.search(r"devices=[2-9]|num_workers=[1-9]", source):
            assert GUARD in source, f"README block {index} starts processes without `{GUARD}`"


def _named_commands() -> list[list[str]]:
    """Every ``lightning-patterns`` command the README names (in shell blocks or inline), as its subcommand words."""
    text = README.read_text()
    found: list[list[str]] = []
    for line in [*"".join(blocks("bash")).splitlines(), *re.findall(r"`([^`\n]+)`", text)]:
        match = re.search(r"(?:lightning-patterns|python -m lightning_patterns)((?:\s+[a-z][a-z_-]*)*)", line)
        if match:
            words = match.group(1).split()[:2]
            if words not in found:
                found.append(words)
    return found


# Parses each command's --help in this one process (light commands import neither torch nor Lightning).
_HELP_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from lightning_patterns.cli import main
    failed = []
    for words in json.loads(sys.argv[1]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main([*words, "--help"])
            except SystemExit as exit_:
                code = exit_.code
        if code not in (0, None) or "usage" not in out.getvalue().lower():
            failed.append([words, code, out.getvalue()[-500:]])
    print(json.dumps(failed))
    """
)


def test_every_command_the_readme_names_exists(tmp_path: Path) -> None:
    import json

    commands = _named_commands()
    names = {" ".join(words) for words in commands}
    assert {"fit", "recipes", "shards write", "shards inspect", "cache info"} <= names, names
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == [], "README commands whose --help fails"
    # The other commands it names: make targets, and the scripts it tells the reader to run.
    makefile = (ROOT / "Makefile").read_text()
    shell = "".join(blocks("bash"))
    for target in {*re.findall(r"`make (\w+)", README.read_text()), *re.findall(r"^make (\w+)", shell, re.MULTILINE)}:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"README names `make {target}`, not in Makefile"
    for script in set(re.findall(r"python ((?:benchmarks|examples)/\w+\.py)", README.read_text())):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
