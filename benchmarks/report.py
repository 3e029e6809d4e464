"""Collect ``benchmarks/results/*.json`` into ``benchmarks/results/REPORT.md`` and PNG bar charts.

The data table shows every figure with its ratio to ours: epoch 1 and peak RSS against lightning_patterns
without cache from S3, epoch 2 against lightning_patterns with the memory cache from S3 (same DataLoader
workers). The goals of issue 8 are checked against the measured figures and stated as held or not.
The latest report is also copied into the "Performance" section of ``benchmarks/README.md``.

Run ``python benchmarks/report.py`` (needs matplotlib; without it the report has no plots).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
_START, _END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _get(row: dict[str, Any] | None, key: str) -> Any:
    return None if row is None else row.get(key)


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f" ({value / reference:.2f}×)"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:,.0f}"


def _reference(rows: list[dict[str, Any]], workers: int, cache: str | None) -> dict[str, Any] | None:
    for row in rows:
        if (
            row.get("loader") == "ours"
            and row.get("source") == "s3"
            and row.get("cache") == cache
            and row.get("workers", 0) == workers
            and "error" not in row
        ):
            return row
    return None


def machine_section(machine: dict[str, Any]) -> list[str]:
    """Markdown lines describing the machine the figures were measured on."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)
    return [
        f"- CPU: {machine.get('cpu')} × {machine.get('nproc')} cores; memory {machine.get('memory_gib')} GiB",
        f"- OS: {machine.get('os')}; Python {machine.get('python')}",
        f"- Packages: {versions}",
        f"- Load average (1, 5, 15 min) when the benchmark ended: {machine.get('load_average')}",
    ]


def data_section(doc: dict[str, Any], title: str = "Data loading") -> list[str]:
    """The data benchmark's table, writes and notes, as Markdown lines."""
    params, rows = doc["params"], doc["rows"]
    lines = [
        f"## {title}",
        "",
        f"{params['samples']:,} Fashion-MNIST-shaped samples (uint8 28×28 + int64 label), batch size "
        f"{params['batch_size']}, no shuffle, {params['shard_bytes'] // 2**20} MiB shards; every figure is the median "
        f"of {params['runs']} runs, each in a fresh process (epoch 1, then epoch 2 in the same process). Ratios in "
        "brackets: epoch 1 and RSS against lightning_patterns without cache from S3, epoch 2 against "
        "lightning_patterns with the memory cache from S3, same workers. Remote MB: bytes read from the remote "
        "(ours: `loader.metrics()['remote_bytes']`; peers: bytes their cache folder gained; I/O limit: bytes read). "
        "First batch: seconds from asking the DataLoader for an iterator to holding the first batch of epoch 1. "
        "Load: the 1-minute load average when the run ended (2 cores; above 2, other work shared the machine).",
        "",
        "| loader | workers | epoch 1 samples/s | epoch 2 samples/s | first batch s | remote MB ep. 1 / ep. 2 "
        "| peak RSS MB | load | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        workers = row.get("workers", 0)
        if "error" in row:
            lines.append(f"| {row['name']} | {workers} | n/a | n/a | – | – | n/a | – | {row['error']} |")
            continue
        ref1 = _reference(rows, workers, None)
        ref2 = _reference(rows, workers, "memory") or ref1
        e1 = _num(row.get("epoch1_sps")) + _ratio(row.get("epoch1_sps"), _get(ref1, "epoch1_sps"))
        e2 = _num(row.get("epoch2_sps")) + _ratio(row.get("epoch2_sps"), _get(ref2, "epoch2_sps"))
        rss = _num(row.get("rss_peak_mb")) + _ratio(row.get("rss_peak_mb"), _get(ref1, "rss_peak_mb"))
        notes = [row["note"]] if row.get("note") else []
        if row.get("tree_rss_peak_mb"):
            notes.append(f"main + workers (sampled sum) {row['tree_rss_peak_mb']:,.0f} MB")
        if row.get("loader") == "io":
            mbps = [r["epochs"][0].get("mb_per_s") for r in row.get("runs", [])]
            mbps = sorted(v for v in mbps if v)
            if mbps:
                notes.append(f"{mbps[len(mbps) // 2]:,.0f} MB/s, one request at a time")
        if row.get("ok") is False:
            notes.append("**CHECK FAILED** (sample count or label sum)")
        remote = f"{_mb(row.get('epoch1_remote_bytes'))} / {_mb(row.get('epoch2_remote_bytes'))}"
        first = row.get("epoch1_first_batch_s")
        first_s = "–" if first is None else f"{first:.3f}"
        load = "–" if row.get("load_average") is None else f"{row['load_average']:.1f}"
        lines.append(
            f"| {row['name']} | {workers} | {e1} | {e2} | {first_s} | {remote} | {rss} | {load} | {'; '.join(notes)} |"
        )
    writes = doc.get("writes") or []
    if writes:
        ours = next((w for w in writes if w["format"] == "ours-s3" and w.get("seconds_median")), None)
        lines += [
            "",
            f"Writers, single process, same samples (median of {params.get('write_runs', 1)} timed writes, each in a "
            "fresh process; ratio to ours → S3):",
            "",
            "| writer | seconds | MB written |",
            "|---|---|---|",
        ]
        for write in writes:
            if write.get("error"):
                lines.append(f"| {write['name']} | n/a: {write['error']} | – |")
                continue
            seconds = _num(write["seconds_median"], 1) + _ratio(
                write["seconds_median"], ours and ours["seconds_median"]
            )
            lines.append(f"| {write['name']} | {seconds} | {_mb(write.get('bytes'))} |")
    return lines


def _memory_plan(row: dict[str, Any], params: dict[str, Any]) -> tuple[int, int, int]:
    """1× and 4× samples and runs of a memory-scaling row (results before per-row sizes keep them in params)."""
    return (
        row.get("samples_1x", params["samples_1x"]),
        row.get("samples_4x", params["samples_4x"]),
        row.get("runs", params["runs"]),
    )


def _sizes(plan: tuple[int, int, int]) -> str:
    return f"{plan[0]:,} → {plan[1]:,}"


def _processes(runs: int) -> str:
    return "one fresh process" if runs == 1 else f"the median of {runs} fresh processes"


def _memory_note(doc: dict[str, Any]) -> str:
    """Why some rows ran fewer times or at smaller sizes than the header says ('' when none did)."""
    params = doc["params"]
    # Library names without the source ("LitData 0.2.76"), once each: the full names hold commas themselves.
    plans = {row["name"].split(",")[0]: _memory_plan(row, params) for row in doc["rows"]}
    fewer = [name for name, plan in plans.items() if plan[2] != params["runs"]]
    smaller = [name for name, plan in plans.items() if plan[:2] != (params["samples_1x"], params["samples_4x"])]
    if not fewer and not smaller:
        return ""
    parts = []
    if fewer:
        parts.append(f"{' and '.join(fewer)} ran fewer processes (their peak RSS varied by under 1 MB between runs)")
    if smaller:
        parts.append(f"{' and '.join(smaller)} read a smaller dataset")
    return (
        " The peers read 5–40× slower than ours (MosaicML Streaming ~5,000 samples/s here), so to keep `make bench` "
        f"within 15 minutes {'; '.join(parts)}: see the samples and runs columns."
    )


def memory_section(doc: dict[str, Any], title: str = "Memory scaling") -> list[str]:
    """The memory-scaling table as Markdown lines; rows measured at other sizes or runs say so in their cells."""
    params = doc["params"]
    lines = [
        f"## {title}",
        "",
        f"Peak RSS (`VmHWM`) of one epoch, 0 workers, at 1× = {params['samples_1x']:,} and 4× = "
        f"{params['samples_4x']:,} samples; {_processes(params['runs'])}. Goal: {params['goal']}. "
        "'Growth' is peak RSS minus the RSS after imports, before the dataset is opened." + _memory_note(doc),
    ]
    lines += [
        "",
        "| option | samples 1× → 4× | runs | RSS 1× MB | RSS 4× MB | 4× / 1× | growth 1× / 4× MB | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        plan = _memory_plan(row, params)
        if "error" in row:
            lines.append(f"| {row['name']} | {_sizes(plan)} | {plan[2]} | n/a | n/a | n/a | – | n/a: {row['error']} |")
            continue
        goal = "holds" if row["goal_met"] else "**misses**"
        lines.append(
            f"| {row['name']} | {_sizes(plan)} | {plan[2]} | {row['rss_1x_mb']:,.0f} | {row['rss_4x_mb']:,.0f} | "
            f"{row['ratio_4x_1x']:.2f} | {row['growth_1x_mb']:,.0f} / {row['growth_4x_mb']:,.0f} | {goal} |"
        )
    return lines


def memory_goal(doc: dict[str, Any]) -> str:
    """The Goals line on memory scaling: held by ours or not, with the sizes; the peers' figures for comparison."""
    params = doc["params"]

    def figures(row: dict[str, Any]) -> str:
        if "error" in row:
            return f"{row['name']}: n/a ({row['error']})"
        return f"{row['name']}: {row['rss_1x_mb']:,.0f} → {row['rss_4x_mb']:,.0f} MB ({row['ratio_4x_1x']:.2f}×)"

    ours = [r for r in doc["rows"] if r["loader"] == "ours"]
    peers = [r for r in doc["rows"] if r["loader"] != "ours"]
    if not ours:
        return "- Peak RSS at 4× ≤ 1.1× at 1×: not measured (no lightning_patterns row ran)."
    sizes = sorted({_sizes(_memory_plan(r, params)) for r in ours})
    held = all(r.get("goal_met") for r in ours)
    line = (
        f"- Peak RSS at 4× ≤ 1.1× at 1×, lightning_patterns at {' / '.join(sizes)} samples, one epoch, 0 workers: "
        f"**{'holds' if held else 'misses'}** — " + "; ".join(figures(r) for r in ours) + "."
    )
    if peers:
        compared = [f"{figures(r)} at {_sizes(_memory_plan(r, params))}" for r in peers]
        line += " For comparison: " + "; ".join(compared) + "."
    return line


def _verdict(held: list[bool]) -> str:
    if not held:
        return "not measured"
    return "holds" if all(held) else ("misses" if not any(held) else "holds only in part")


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if "error" not in row and all(row.get(k, None if k != "workers" else 0) == v for k, v in match.items()):
            return row
    return None


def _load_note(row: dict[str, Any] | None) -> str:
    return "" if row is None or row.get("load_average") is None else f", load {row['load_average']:.1f}"


def limits_goals(data: dict[str, Any], memory: dict[str, Any] | None) -> list[str]:
    """The goals of issue 20 (the data path at the hardware limits), each with its ratio and the load it ran at."""
    rows = data["rows"]
    lines = []
    memmap = _find(rows, loader="memmap", workers=0)
    parts, held = [], []
    for source in ("s3", "local"):
        for cache in ("memory", "disk"):
            row = _find(rows, loader="ours", source=source, cache=cache, workers=0, link=None)
            if row and memmap:
                ratio = row["epoch2_sps"] / memmap["epoch2_sps"]
                held.append(ratio >= 0.95)
                parts.append(f"{cache} cache from {source} {row['epoch2_sps']:,.0f}/s ({ratio:.2f}×{_load_note(row)})")
    limit = f"{memmap['epoch2_sps']:,.0f}/s{_load_note(memmap)}" if memmap else "n/a"
    lines.append(
        f"- Cached epoch 2 ≥ 0.95× the `np.memmap` batched-read limit ({limit}): **{_verdict(held)}** — "
        + "; ".join(parts)
        + "."
    )
    parts, held = [], []
    for source in ("s3", "local"):
        plain = _find(rows, loader="ours", source=source, cache=None, workers=0, link=None)
        for cache in ("memory", "disk"):
            row = _find(rows, loader="ours", source=source, cache=cache, workers=0, link=None)
            if row and plain:
                ratio = row["epoch1_sps"] / plain["epoch1_sps"]
                held.append(ratio >= 0.9)
                parts.append(
                    f"{cache} cache from {source} {row['epoch1_sps']:,.0f}/s against {plain['epoch1_sps']:,.0f}/s "
                    f"({ratio:.2f}×{_load_note(row)})"
                )
    lines.append(f"- Epoch 1 with a cache ≥ 0.9× epoch 1 without: **{_verdict(held)}** — " + "; ".join(parts) + ".")
    linked = [r for r in rows if r.get("link") and r["loader"] == "ours" and "error" not in r]
    if linked:
        mbps = linked[0]["link_mbps"]
        parts, held, ttfb_parts, ttfb_held = [], [], [], []
        measured = _find(rows, loader="io", link=True)
        for row in linked:
            per_sample = row["dataset_bytes"] / row["samples"]
            link_sps = mbps * 1e6 / per_sample
            ratio = row["epoch1_sps"] / link_sps
            held.append(ratio >= 0.9)
            parts.append(f"{row.get('cache') or 'no'} cache {row['epoch1_sps']:,.0f}/s ({ratio:.2f}×{_load_note(row)})")
            shard_s = row["first_shard_bytes"] / (mbps * 1e6)
            first = row.get("epoch1_first_batch_s")
            if first is not None:
                ttfb_held.append(first <= 1.2 * shard_s)
                ttfb_parts.append(f"{row.get('cache') or 'no'} cache {first:.3f} s ({first / shard_s:.2f}×)")
        check = ""
        if measured:
            check = f"; the sequential read through the same link reaches {measured['epoch1_sps']:,.0f}/s"
        lines.append(
            f"- Epoch 1 at an emulated {mbps:g} MB/s link ≥ 0.9× the link ({link_sps:,.0f} samples/s{check}): "
            f"**{_verdict(held)}** — " + "; ".join(parts) + "."
        )
        lines.append(
            f"- Time to first batch at that link ≤ 1.2× one shard's transfer time ({shard_s:.3f} s for "
            f"{row['first_shard_bytes'] / 1e6:.1f} MB): **{_verdict(ttfb_held)}** — " + "; ".join(ttfb_parts) + "."
        )
    workers2 = _find(rows, loader="ours", source="s3", cache=None, workers=2, link=None)
    if workers2 and workers2.get("dataset_bytes"):
        ratios = [(workers2.get(f"epoch{e}_remote_bytes") or 0) / workers2["dataset_bytes"] for e in (1, 2)]
        lines.append(
            f"- 2 DataLoader workers, no cache: remote bytes per epoch ≤ 1.01× the dataset: "
            f"**{_verdict([r <= 1.01 for r in ratios])}** — epoch 1 {ratios[0]:.4f}×, epoch 2 {ratios[1]:.4f}× "
            f"({workers2['dataset_bytes'] / 1e6:,.1f} MB of shards{_load_note(workers2)})."
        )
    litdata = [r for r in rows if r["loader"] == "litdata" and r.get("workers", 0) == 0 and "error" not in r]
    ours = [
        r
        for r in rows
        if r["loader"] == "ours" and r.get("cache") in (None, "disk") and r.get("workers", 0) == 0 and not r.get("link")
    ]
    if litdata and ours:
        lowest = min(r["rss_peak_mb"] for r in litdata)
        parts = [f"{r['name'].removeprefix('lightning_patterns, ')} {r['rss_peak_mb']:,.0f} MB" for r in ours]
        held = [r["rss_peak_mb"] <= lowest for r in ours]
        lines.append(
            f"- Peak RSS of the main process ≤ LitData's (its lowest here, {lowest:,.0f} MB), data benchmark at "
            f"{data['params']['samples']:,} samples, no cache and disk cache: **{_verdict(held)}** — "
            + "; ".join(parts)
            + "."
        )
    if memory:
        peers = [r for r in memory["rows"] if r["loader"] == "litdata" and "error" not in r]
        mine = [r for r in memory["rows"] if r["loader"] == "ours" and "error" not in r]
        if peers and mine:
            peer = peers[0]
            parts, held = [], []
            for label in ("1x", "4x"):
                for row in mine:
                    held.append(row[f"rss_{label}_mb"] <= peer[f"rss_{label}_mb"])
                    parts.append(
                        f"{row['name'].removeprefix('lightning_patterns, ')} at {row[f'samples_{label}']:,}: "
                        f"{row[f'rss_{label}_mb']:,.0f} MB against {peer[f'rss_{label}_mb']:,.0f} MB "
                        f"({row[f'rss_{label}_mb'] / peer[f'rss_{label}_mb']:.2f}×)"
                    )
            lines.append(
                f"- Peak RSS ≤ LitData's at 1× and 4× (memory scaling, one epoch): **{_verdict(held)}** — "
                + "; ".join(parts)
                + "."
            )
    return lines


def goals_section(data: dict[str, Any] | None, memory: dict[str, Any] | None) -> list[str]:
    """Which goals hold (issue 8's and issue 20's), with the figures."""
    lines = ["## Goals", ""]
    if data:
        lines += limits_goals(data, memory)
    if data:
        rows = [r for r in data["rows"] if "error" not in r and r.get("workers", 0) == 0]
        ours = [r for r in rows if r["loader"] == "ours" and r.get("cache") is None]
        peers = [r for r in rows if r["loader"] in ("litdata", "mosaic")]
        if ours and peers:
            ours_s3 = next((r for r in ours if r["source"] == "s3"), ours[0])
            ours_local = next((r for r in ours if r["source"] == "local"), ours_s3)
            best_peer = max(peers, key=lambda r: r["epoch1_sps"])
            held = ours_s3["epoch1_sps"] >= best_peer["epoch1_sps"]
            lines.append(
                f"- Epoch 1 ≥ best peer: **{'holds' if held else 'misses'}** — ours without cache from S3 "
                f"{ours_s3['epoch1_sps']:,.0f} samples/s (from local disk {ours_local['epoch1_sps']:,.0f}) against "
                f"the best peer, {best_peer['name']}, {best_peer['epoch1_sps']:,.0f} samples/s "
                f"({ours_s3['epoch1_sps'] / best_peer['epoch1_sps']:.2f}×), 0 workers. LitData reads local disk here "
                "(it cannot reach an http:// S3 endpoint), so ours from S3 is held against a peer reading from disk."
            )
        else:
            lines.append("- Epoch 1 ≥ best peer: not measured (no peer or no lightning_patterns row ran).")
        tensor = next((r for r in rows if r["loader"] == "tensor"), None)
        memory_rows = [r for r in rows if r["loader"] == "ours" and r.get("cache") == "memory"]
        if tensor and memory_rows:
            parts, held = [], []
            for row in memory_rows:
                ratio = row["epoch2_sps"] / tensor["epoch2_sps"]
                held.append(ratio >= 0.95)
                parts.append(f"from {row['source']} {row['epoch2_sps']:,.0f} samples/s ({ratio:.2f}×)")
            verdict = "holds" if all(held) else ("misses" if not any(held) else "holds only in part")
            lines.append(
                f"- Epoch 2 with the memory cache ≥ 0.95× the in-memory TensorDataset "
                f"({tensor['epoch2_sps']:,.0f} samples/s): **{verdict}** — " + "; ".join(parts) + ", 0 workers."
            )
        else:
            lines.append(f"- Epoch 2 with the memory cache: not measured ({data.get('caching')}).")
    if memory:
        lines.append(memory_goal(memory))
    return lines


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_data(doc: dict[str, Any], path: Path) -> bool:
    """Bar chart of epoch 1 / epoch 2 samples/s per configuration (log scale); False without matplotlib."""
    plt = _pyplot()
    rows = [r for r in doc["rows"] if "error" not in r]
    if plt is None or not rows:
        return False
    labels = [f"{r['name']} [w={r.get('workers', 0)}]" for r in rows]
    e1 = [r.get("epoch1_sps") or 0 for r in rows]
    e2 = [r.get("epoch2_sps") or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], e1, height=0.4, label="epoch 1")
    ax.barh([y + 0.2 for y in ys], e2, height=0.4, label="epoch 2")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale, higher is better)")
    ax.set_title(f"Data loading, {doc['params']['samples']:,} samples, batch {doc['params']['batch_size']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(doc: dict[str, Any], path: Path) -> bool:
    """Bar chart of peak RSS at 1× and 4× per streaming option; False without matplotlib."""
    plt = _pyplot()
    rows = [r for r in doc["rows"] if "error" not in r]
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["rss_1x_mb"] for r in rows], width=0.4, label="1×")
    ax.bar([x + 0.2 for x in xs], [r["rss_4x_mb"] for r in rows], width=0.4, label="4×")
    # Each bar pair is labelled with its own sizes: the peers may run at smaller ones (see memory_section).
    labels = [f"{r['name'].replace(', ', chr(10), 1)}\n{_sizes(_memory_plan(r, doc['params']))}" for r in rows]
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("peak RSS, MB (lower is better)")
    ax.set_title("Peak RSS at 1× and 4× the data, one epoch, 0 workers")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def other_sections(results: Path, known: set[str]) -> list[str]:
    """Sections for result files written by the other benchmarks (their own ``markdown`` if they give one)."""
    lines: list[str] = []
    for path in sorted(results.glob("*.json")):
        if path.name in known:
            continue
        doc = _load(path)
        if doc is None:
            continue
        title = doc.get("title") or str(doc.get("benchmark") or path.stem).replace("_", " ").capitalize()
        lines += ["", f"## {title}", ""]
        markdown = doc.get("markdown") or doc.get("table")
        if isinstance(markdown, str):
            lines.append(markdown.strip())
        else:
            lines.append(f"See [`{path.name}`]({path.name}) (its keys: {', '.join(sorted(doc)[:12])}).")
    return lines


def parameter_server_section(doc: dict[str, Any]) -> list[str]:
    """The parameter-server table (the ``markdown`` that ``parameter_server.py`` wrote) with a line of context."""
    params = doc.get("params", {})
    quick = " (a `--quick` run: the 1M model only)" if params.get("quick") else ""
    lines = [
        f"## {doc.get('title') or 'Parameter server vs DDP'}",
        "",
        "Training speed and traffic of `ParameterServerStrategy` (S servers, sync or async) against Lightning's DDP "
        f"with the same {params.get('workers', 2)} CPU worker processes and MLP (issue 7), measured by "
        f"`benchmarks/parameter_server.py` in {doc.get('duration_s', 0):.0f} s{quick}; the servers are extra "
        "processes on the same cores.",
        "",
    ]
    markdown = doc.get("markdown")
    if isinstance(markdown, str):
        lines.append(markdown.strip())
    else:
        lines.append("n/a: `parameter_server.json` has no `markdown` table.")
    return lines


def build_report(results: Path, command: str | None) -> str:
    """The Markdown report for the JSON files in ``results`` (plots are written beside it)."""
    data = _load(results / "data_loading.json")
    memory = _load(results / "memory_scaling.json")
    parameter_server = _load(results / "parameter_server.json")
    lines = ["# Benchmark report", ""]
    machine = (data or memory or {}).get("machine")
    started = (data or memory or {}).get("started")
    if command:
        lines.append(f"Command: `{command}`" + (f", started {started}" if started else "") + ".")
        lines.append("")
    if machine:
        lines += ["Machine:", "", *machine_section(machine), ""]
    lines += goals_section(data, memory)
    if data:
        lines += ["", *data_section(data)]
        if plot_data(data, results / "data_loading.png"):
            lines += ["", "![samples/s per loader](data_loading.png)"]
    # Extra runs saved beside the main ones (e.g. data_loading_workers2.json) follow the main section.
    data_extra = sorted(results.glob("data_loading_*.json"))
    for path in data_extra:
        doc = _load(path)
        if doc:
            section = data_section(doc, f"Data loading ({path.stem.removeprefix('data_loading_')})")
            # Not produced by this command: say when it ran, so its figures are not read as this run's.
            note = f"A separate run, not part of `make bench`: [`{path.name}`]({path.name}), "
            note += f"started {doc.get('started')}."
            lines += ["", section[0], "", note, *section[1:]]
    if memory:
        lines += ["", *memory_section(memory)]
        if plot_memory(memory, results / "memory_scaling.png"):
            lines += ["", "![peak RSS at 1× and 4×](memory_scaling.png)"]
    memory_extra = sorted(results.glob("memory_scaling_*.json"))
    for path in memory_extra:
        doc = _load(path)
        if doc:
            lines += ["", *memory_section(doc, f"Memory scaling ({path.stem.removeprefix('memory_scaling_')})")]
    if parameter_server:
        lines += ["", *parameter_server_section(parameter_server)]
    known = {"data_loading.json", "memory_scaling.json", "parameter_server.json"}
    lines += other_sections(results, known | {p.name for p in data_extra + memory_extra})
    return "\n".join(lines) + "\n"


def update_readme(report: str, readme: Path) -> None:
    """Replace the generated part of the README's "Performance" section with ``report``."""
    if not readme.exists():
        return
    text = readme.read_text()
    if _START not in text or _END not in text:
        return
    body = report.replace("# Benchmark report\n", "", 1)
    # Links in the report are relative to results/; the README sits one folder up.
    body = re.sub(r"\]\((?!https?:)([^)]+)\)", r"](results/\1)", body)
    new = text[: text.index(_START) + len(_START)] + "\n" + body.strip() + "\n" + text[text.index(_END) :]
    readme.write_text(new)


def main(argv: list[str] | None = None) -> None:
    """Write REPORT.md and the plots from the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    parser.add_argument("--command", default=None, help="the command that produced the results, for the report")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    results = Path(args.results)
    report = build_report(results, args.command)
    (results / "REPORT.md").write_text(report)
    if not args.no_readme:
        update_readme(report, README)
    print(report)


if __name__ == "__main__":
    main()
