#!/usr/bin/env bash
# `make bench`: create (or reuse) the benchmark virtualenv benchmarks/.venv-bench, then run every benchmark.
# The peers (LitData, MosaicML Streaming) are installed there, never into the project's .venv.
# Arguments are passed on to run_all.py (e.g. --quick, --samples 100000, --workers 0 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${BENCH_VENV:-$HERE/.venv-bench}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed"

if [[ ! -f "$STAMP" || "$HERE/requirements-bench.txt" -nt "$STAMP" ]]; then
    echo "[run_all.sh] installing the benchmark environment into $VENV (a few minutes, once)"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    # Keep git and ruff (which honours .gitignore) out of the virtualenv, as Python 3.13's venv does itself.
    echo '*' > "$VENV/.gitignore"
    # torch is pinned in this same command (requirements-bench.txt), or a peer pulls a CUDA build.
    "$VENV/bin/python" -m pip install --quiet -r "$HERE/requirements-bench.txt" -e "$ROOT"
    # The peers depend on torchvision, whose PyPI wheels are CUDA-linked: beside the CPU torch it fails to load
    # and breaks torchmetrics (and so pytorch_lightning). Neither peer needs it for this benchmark.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision || true
    touch "$STAMP"
fi

cd "$ROOT"
exec "$VENV/bin/python" "$HERE/run_all.py" "$@"
