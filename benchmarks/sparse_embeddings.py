"""Benchmark: a large embedding table on the parameter servers (sparse rows) beside DDP (dense table), on CPU.

The module is an ``nn.Embedding(rows, 64)`` built in ``configure_model`` (4 id columns, power-law ids, a batch of
1,024 per worker) and a linear head, trained with SGD by 2 workers. For each table size it reports steps per
second, bytes per step per worker (sent plus received) and each worker's peak RSS:

- parameter server (1 server, ``LP_SPARSE_BENCH_SERVERS=2`` for more; the table is sparse, detected by
  ``sparse_min_rows``): bytes are measured, the dense head's protocol plus ``ps/sparse_bytes``;
- DDP: bytes are the ring all-reduce's theory, ``2 × 2 (W - 1) / W × gradient bytes`` (DDP does not count them).
  DDP is always tried, also where 2 workers may not hold the dense table (parameters, gradients and DDP's bucket,
  ``3 × rows × 64 × 4`` bytes each: about 16 GiB at 10M rows): every launch runs in its own process group under
  a watchdog (:mod:`lightning_patterns.testing.memory_guard`) that kills the group when its processes hold more
  than ``--max-rss-gib`` together (default 85% of the machine's memory) or the machine's available memory falls
  under ``--min-available-gib`` (default 1.5). That is then the result: "out of memory: DDP workers reached X GiB
  of Y GiB total before being stopped (...)".

Each configuration runs ``--repeats`` times (default 3), the parameter server beside DDP in each round so that a
change of load hits both; the table shows the median steps/s, the JSON every run's and the load average at its
start. DDP above 1M rows runs once, last, with 5 timed steps; the parameter server above 10M rows runs once. The
default sizes end with 100M rows (25.6 GB per DDP replica: more than this 24 GiB machine holds, while the
servers create only the rows a batch touches), to show a table that trains where DDP cannot.

Run it as a script (each configuration is its own launch, so each peak RSS is its own):

    python benchmarks/sparse_embeddings.py                  # 100k (RSS baseline), 1M, 10M and 100M rows
    python benchmarks/sparse_embeddings.py --quick          # 100k and 1M rows, fewer steps, one run each
    python benchmarks/sparse_embeddings.py --skip-ddp       # the parameter server only
    python benchmarks/sparse_embeddings.py --sizes 1e7 --skip-ps --repeats 1   # DDP at 10M rows only
    python benchmarks/sparse_embeddings.py --out PATH       # also write a JSON result (what `make bench` does)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

DIM = 64
COLUMNS = 4
BATCH = 1024
WORKERS = 2
SERVERS = int(os.environ.get("LP_SPARSE_BENCH_SERVERS", "1"))
WARMUP = 3
CHILD_TIMEOUT_S = 600
TITLE = "Sparse embeddings on the parameter server beside DDP"


class _Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Batches of power-law ids (``rows × u⁴``: a few rows very popular, most rarely seen) and click labels.

    An item is a whole batch, so that no per-sample collation (the same for both strategies) blurs the step time.
    """

    def __init__(self, rows: int, batches: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = (torch.rand(batches, BATCH, COLUMNS, generator=generator) ** 4 * rows).long().clamp_(max=rows - 1)
        self.labels = torch.randint(0, 2, (batches, BATCH), generator=generator).float()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[index], self.labels[index]


def _module_class() -> Any:
    import pytorch_lightning as pl

    class TableModel(pl.LightningModule):  # type: ignore[misc]
        def __init__(self, rows: int, steps: int) -> None:
            super().__init__()
            self.rows = rows
            self.steps = steps
            self.table: nn.Embedding | None = None
            self.head = nn.Linear(DIM, 1)

        def configure_model(self) -> None:
            if self.table is None:
                self.table = nn.Embedding(self.rows, DIM)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ids, labels = batch
            assert self.table is not None
            logits = self.head(self.table(ids).mean(dim=1)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logits, labels)

        def train_dataloader(self) -> DataLoader[Any]:
            data = _Batches(self.rows, WORKERS * self.steps)
            sampler = torch.utils.data.DistributedSampler(
                data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
            )
            return DataLoader(data, batch_size=None, sampler=sampler)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return TableModel


def _recorder_class() -> Any:
    import pytorch_lightning as pl

    from lightning_patterns.testing.memory_guard import group_cpu_seconds

    class Recorder(pl.Callback):  # type: ignore[misc]
        """Step times after the warm-up, bytes per step, peak RSS (before the fit's end, which gathers nothing)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.bytes: list[float] = []
            self.cpu_start = 0.0

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.times.append(time.perf_counter())
            if len(self.times) == WARMUP + 1:
                self.cpu_start = group_cpu_seconds(os.getpgrp())
            strategy = trainer.strategy
            dense = getattr(strategy, "telemetry", None)
            sparse = getattr(strategy, "sparse_telemetry", None)
            if dense is not None:
                self.bytes.append(dense.bytes_pushed + dense.bytes_pulled + (sparse.bytes if sparse else 0))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            timed = self.times[WARMUP:]
            record = {
                "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None,
                "bytes_per_step": sum(self.bytes[WARMUP:]) / len(self.bytes[WARMUP:]) if self.bytes[WARMUP:] else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                # Every process of the launch (workers, servers): CPU per step, which load on the machine changes
                # less than wall time (the benchmark shares 2 cores with other work).
                "cpu_ms_per_step": 1e3 * (group_cpu_seconds(os.getpgrp()) - self.cpu_start) / (len(timed) - 1)
                if len(timed) > 1
                else None,
                "rank": trainer.global_rank,
            }
            out = Path(os.environ["LP_SPARSE_BENCH_OUT"])
            out.with_name(f"{out.stem}_rank{trainer.global_rank}.json").write_text(json.dumps(record))

    return Recorder


def child(kind: str, rows: int, steps: int) -> None:
    """One fit (this process is worker rank 0; Lightning's launcher starts rank 1 from the same command)."""
    import pytorch_lightning as pl

    from lightning_patterns.strategies import ParameterServerStrategy

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    strategy: Any = (
        ParameterServerStrategy(num_servers=SERVERS, sparse_gather_bytes=0, timeout=120.0) if kind == "ps" else "ddp"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORKERS,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_recorder_class()()],
    )
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    trainer.fit(_module_class()(rows, steps))
    prof.disable()
    if os.environ.get("LP_PROF"):
        prof.dump_stats(os.environ["LP_PROF"] + f"/worker{trainer.global_rank}.prof")


def _ddp_need(rows: int) -> int:
    """Bytes 2 DDP workers need for the dense table: parameters, gradients and DDP's bucket, each, plus 1 GB."""
    return WORKERS * (3 * rows * DIM * 4 + 2**30)


@dataclass(frozen=True)
class MemoryLimits:
    """When the watchdog stops a configuration: its processes' total RSS cap, the machine's available floor."""

    max_rss_bytes: int
    min_available_bytes: int


def run(kind: str, rows: int, steps: int, scratch: Path, limits: MemoryLimits) -> dict[str, Any]:
    """Launch one configuration under the memory watchdog; its rank-0 record, with the worker peak RSS of both ranks.

    The launch is its own process group (rank 0, the rank 1 Lightning starts, the servers): if the group's RSS
    passes ``limits.max_rss_bytes`` or the machine's available memory falls under ``limits.min_available_bytes``,
    the whole group is killed and that is the configuration's result ("out of memory: ...").
    """
    from lightning_patterns.testing.launch import free_port, launch_env
    from lightning_patterns.testing.memory_guard import run_with_memory_guard, total_memory_bytes

    label = "parameter server" if kind == "ps" else "DDP"
    result: dict[str, Any] = {"strategy": label, "rows": rows, "load_avg_1m": os.getloadavg()[0]}
    out = scratch / f"{kind}_{rows}.json"
    records = [out.with_name(f"{out.stem}_rank{rank}.json") for rank in range(WORKERS)]
    for path in records:
        path.unlink(missing_ok=True)
    env = {**launch_env(free_port()), "LP_SPARSE_BENCH_OUT": str(out)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--rows", str(rows)]
    guarded = run_with_memory_guard(
        [*command, "--steps", str(steps)],
        env=env,
        timeout=CHILD_TIMEOUT_S,
        max_rss_bytes=limits.max_rss_bytes,
        min_available_bytes=limits.min_available_bytes,
        poll_s=0.25,  # a look costs about 2.5 ms of CPU (a scan of /proc): 1 % of a core, taken from the run measured
    )
    result["seconds"] = guarded.seconds
    result["peak_rss_total_gib"] = guarded.peak_rss_bytes / 2**30
    if guarded.stopped is not None:
        what = "out of memory" if "memory" in guarded.stopped or "cap" in guarded.stopped else "stopped"
        result["outcome"] = (
            f"{what}: {label} workers reached {guarded.peak_rss_bytes / 2**30:.1f} GiB of "
            f"{total_memory_bytes() / 2**30:.1f} GiB total before being stopped ({guarded.stopped})"
        )
        return result
    if guarded.returncode != 0 or not all(path.exists() for path in records):
        result["outcome"] = f"failed (exit {guarded.returncode}): {guarded.stderr.strip().splitlines()[-1:]}"
        return result
    ranks = [json.loads(path.read_text()) for path in records]
    result.update({key: ranks[0][key] for key in ("steps_per_s", "bytes_per_step", "cpu_ms_per_step")})
    result["peak_rss_mb"] = max(record["peak_rss_mb"] for record in ranks)
    if kind == "ddp":
        result["bytes_per_step"] = 2 * 2 * (WORKERS - 1) / WORKERS * (rows * DIM + DIM + 1) * 4
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from the repeats of a configuration: the median steps/s, every run's, their load."""
    measured = [run for run in runs if "outcome" not in run]
    if not measured:
        return runs[-1]
    row = dict(sorted(measured, key=lambda run: run["steps_per_s"])[(len(measured) - 1) // 2])  # the (lower) median
    row["steps_per_s_runs"] = [run["steps_per_s"] for run in measured]
    row["load_avg_1m"] = [run["load_avg_1m"] for run in measured]
    row["steps_per_s"] = statistics.median(row["steps_per_s_runs"])
    row["cpu_ms_per_step_runs"] = [run["cpu_ms_per_step"] for run in measured]
    row["cpu_ms_per_step"] = statistics.median(row["cpu_ms_per_step_runs"])
    row["repeats"] = len(measured)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| table rows × 64 | strategy | steps/s | CPU ms/step (all processes) | bytes/step/worker | peak worker RSS |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "outcome" in row:
            lines.append(f"| {row['rows']:,} | {row['strategy']} | {row['outcome']} | | | |")
            continue
        lines.append(
            f"| {row['rows']:,} | {row['strategy']} | {row['steps_per_s']:.2f} | {row['cpu_ms_per_step']:.1f} | "
            f"{row['bytes_per_step']:,.0f} | "
            f"{row['peak_rss_mb']:,.0f} MB |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, from the measured rows."""
    by = {(row["strategy"], row["rows"]): row for row in rows}
    out: dict[str, Any] = {}
    ps, ddp = by.get(("parameter server", 1_000_000)), by.get(("DDP", 1_000_000))
    if ps and ddp and "outcome" not in ps and "outcome" not in ddp:
        out["speedup_1m"] = ps["steps_per_s"] / ddp["steps_per_s"]
        if len(ps.get("steps_per_s_runs", ())) > 1 and len(ddp.get("steps_per_s_runs", ())) > 1:
            out["speedup_1m_range"] = [
                min(ps["steps_per_s_runs"]) / max(ddp["steps_per_s_runs"]),
                max(ps["steps_per_s_runs"]) / min(ddp["steps_per_s_runs"]),
            ]
        out["bytes_ratio_1m"] = ddp["bytes_per_step"] / ps["bytes_per_step"]
        # The same comparison in CPU time per step (all processes), which the machine's load changes less.
        out["cpu_ratio_1m"] = ddp["cpu_ms_per_step"] / ps["cpu_ms_per_step"]
    small, large = by.get(("parameter server", 100_000)), by.get(("parameter server", 10_000_000))
    if small and large and "outcome" not in small and "outcome" not in large:
        out["rss_ratio_10m_over_100k"] = large["peak_rss_mb"] / small["peak_rss_mb"]
        out["steps_ratio_10m_over_100k"] = large["steps_per_s"] / small["steps_per_s"]
    middle = by.get(("parameter server", 1_000_000))
    if small and middle and "outcome" not in small and "outcome" not in middle:
        out["steps_ratio_1m_over_100k"] = middle["steps_per_s"] / small["steps_per_s"]
    if large:
        out["ps_trains_10m"] = "outcome" not in large
        ddp_large = by.get(("DDP", 10_000_000))
        if ddp_large:
            out["ddp_10m"] = ddp_large.get("outcome", f"ran: {ddp_large.get('steps_per_s', 0):.3f} steps/s")
    # A table too big for DDP's replicas on this machine (25.6 GB per worker at 100M rows x 64 fp32).
    huge_ps, huge_ddp = by.get(("parameter server", 100_000_000)), by.get(("DDP", 100_000_000))
    if huge_ps:
        out["ps_trains_100m"] = "outcome" not in huge_ps
    if huge_ddp:
        out["ddp_100m"] = huge_ddp.get("outcome", f"ran: {huge_ddp.get('steps_per_s', 0):.3f} steps/s")
    return out


def plan(sizes: list[int], repeats: int, skip_ps: bool, skip_ddp: bool) -> list[tuple[str, int]]:
    """The launches, in order: each repeat runs every size's parameter server and DDP beside each other (so a
    change of the machine's load hits both), DDP above 1M rows once, last (it may take most of the memory)."""
    launches: list[tuple[str, int]] = []
    for repeat in range(repeats):
        for size in sizes:
            if not skip_ps and (size <= 10_000_000 or repeat == 0):  # past 10M: to show it trains, once
                launches.append(("ps", size))
            if not skip_ddp and size != 100_000 and size <= 1_000_000:  # 100k: the PS's RSS baseline only
                launches.append(("ddp", size))
    launches += [("ddp", size) for size in sizes if not skip_ddp and size > 1_000_000]
    return launches


def main(argv: list[str] | None = None) -> None:
    from lightning_patterns.testing.memory_guard import total_memory_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows, fewer steps, one run each")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--sizes", default=None, help="comma-separated table sizes (default: 1e5,1e6,1e7,1e8)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each configuration (default 3; DDP > 1M: 1)")
    parser.add_argument("--skip-ddp", action="store_true", help="parameter-server rows only")
    parser.add_argument("--skip-ps", action="store_true", help="DDP rows only")
    parser.add_argument(
        "--max-rss-gib", type=float, default=None, help="stop a launch whose processes hold more (default: 85%% of RAM)"
    )
    parser.add_argument(
        "--min-available-gib", type=float, default=1.5, help="stop a launch when the machine has less available"
    )
    parser.add_argument("--child", choices=("ps", "ddp"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rows, args.steps)
        return
    started = time.time()
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000, 100_000_000]
    if args.sizes:
        sizes = [int(float(size)) for size in args.sizes.split(",")]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    steps = {"ps": 15, "ddp": 6} if args.quick else {"ps": 60, "ddp": 12}
    max_rss = args.max_rss_gib * 2**30 if args.max_rss_gib else 0.85 * total_memory_bytes()
    limits = MemoryLimits(int(max_rss), int(args.min_available_gib * 2**30))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"sparse_embeddings_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for kind, size in plan(sizes, repeats, args.skip_ps, args.skip_ddp):
        # DDP above 1M rows: fewer steps, each all-reduces the whole table (2.56 GB at 10M × 64).
        count = steps[kind] if kind == "ps" or size <= 1_000_000 else WARMUP + 5
        record = run(kind, size, count, scratch, limits)
        print(f"[sparse] {size:,} rows, {record['strategy']}: {json.dumps(record)}", flush=True)
        runs.setdefault((kind, size), []).append(record)
    rows = [summarise(runs[key]) for key in sorted(runs, key=lambda key: (key[1], key[0] != "ps"))]
    table = markdown_table(rows)
    result = {"goals": goals(rows)}
    sys.stdout.write(table + "\n" + json.dumps(result, indent=1) + "\n")
    if args.out:
        doc = {
            "benchmark": "sparse_embeddings",
            "title": TITLE,
            "params": {
                "dim": DIM,
                "columns": COLUMNS,
                "batch": BATCH,
                "workers": WORKERS,
                "servers": SERVERS,
                "repeats": repeats,
                "max_rss_gib": limits.max_rss_bytes / 2**30,
                "min_available_gib": limits.min_available_bytes / 2**30,
            },
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "duration_s": time.time() - started,
            "rows": rows,
            "goals": result["goals"],
            "markdown": table,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
