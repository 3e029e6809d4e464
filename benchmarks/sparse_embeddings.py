"""Benchmark: a large embedding table on the parameter servers (sparse rows) beside DDP (dense table), on CPU.

The module is an ``nn.Embedding(rows, 64)`` built in ``configure_model`` (4 id columns, power-law ids, a batch of
1,024 per worker) and a linear head, trained with SGD by 2 workers. For each table size it reports steps per
second, bytes per step per worker (sent plus received) and each worker's peak RSS:

- parameter server (1 server, ``LP_SPARSE_BENCH_SERVERS=2`` for more; the table is sparse, detected by
  ``sparse_min_rows``): bytes are measured, the dense head's protocol plus ``ps/sparse_bytes``;
- DDP: bytes are the ring all-reduce's theory, ``2 × 2 (W - 1) / W × gradient bytes`` (DDP does not count them).
  Where 2 workers cannot hold the dense table (parameters, gradients and DDP's bucket, ``3 × rows × 64 × 4``
  bytes each) in half this machine's available memory, DDP is not started, and that is its result.

Run it as a script (each configuration is its own launch, so each peak RSS is its own):

    python benchmarks/sparse_embeddings.py                  # 100k (RSS baseline), 1M and 10M rows
    python benchmarks/sparse_embeddings.py --quick          # 100k and 1M rows, fewer steps
    python benchmarks/sparse_embeddings.py --out PATH       # also write a JSON result (what `make bench` does)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
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

    class Recorder(pl.Callback):  # type: ignore[misc]
        """Step times after the warm-up, bytes per step, peak RSS (before the fit's end, which gathers nothing)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.bytes: list[float] = []

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.times.append(time.perf_counter())
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
    trainer.fit(_module_class()(rows, steps))


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _ddp_need(rows: int) -> int:
    """Bytes 2 DDP workers need for the dense table: parameters, gradients and DDP's bucket, each, plus 1 GB."""
    return WORKERS * (3 * rows * DIM * 4 + 2**30)


def run(kind: str, rows: int, steps: int, scratch: Path) -> dict[str, Any]:
    """Launch one configuration; its rank-0 record, with the worker peak RSS of both ranks."""
    from lightning_patterns.testing.launch import free_port, launch_env

    result: dict[str, Any] = {"strategy": "parameter server" if kind == "ps" else "DDP", "rows": rows}
    if kind == "ddp" and _ddp_need(rows) > _available_bytes() // 2:
        result["skipped"] = (
            f"not run: 2 DDP workers need about {_ddp_need(rows) / 2**30:.1f} GiB for the dense table, "
            f"{_available_bytes() / 2**30:.1f} GiB are available"
        )
        return result
    out = scratch / f"{kind}_{rows}.json"
    env = {**launch_env(free_port()), "LP_SPARSE_BENCH_OUT": str(out)}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--rows",
        str(rows),
        "--steps",
        str(steps),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    result["seconds"] = time.perf_counter() - started
    records = [out.with_name(f"{out.stem}_rank{rank}.json") for rank in range(WORKERS)]
    if proc.returncode != 0 or not all(path.exists() for path in records):
        result["skipped"] = f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        return result
    ranks = [json.loads(path.read_text()) for path in records]
    result.update({key: ranks[0][key] for key in ("steps_per_s", "bytes_per_step")})
    result["peak_rss_mb"] = max(record["peak_rss_mb"] for record in ranks)
    if kind == "ddp":
        result["bytes_per_step"] = 2 * 2 * (WORKERS - 1) / WORKERS * (rows * DIM + DIM + 1) * 4
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| table rows × 64 | strategy | steps/s | bytes/step/worker | peak worker RSS |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['rows']:,} | {row['strategy']} | {row['skipped']} | | |")
            continue
        lines.append(
            f"| {row['rows']:,} | {row['strategy']} | {row['steps_per_s']:.2f} | {row['bytes_per_step']:,.0f} | "
            f"{row['peak_rss_mb']:,.0f} MB |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, from the measured rows."""
    by = {(row["strategy"], row["rows"]): row for row in rows}
    out: dict[str, Any] = {}
    ps, ddp = by.get(("parameter server", 1_000_000)), by.get(("DDP", 1_000_000))
    if ps and ddp and "skipped" not in ps and "skipped" not in ddp:
        out["speedup_1m"] = ps["steps_per_s"] / ddp["steps_per_s"]
        out["bytes_ratio_1m"] = ddp["bytes_per_step"] / ps["bytes_per_step"]
    small, large = by.get(("parameter server", 100_000)), by.get(("parameter server", 10_000_000))
    if small and large and "skipped" not in small and "skipped" not in large:
        out["rss_ratio_10m_over_100k"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    if large:
        out["ps_trains_10m"] = "skipped" not in large
        ddp_large = by.get(("DDP", 10_000_000))
        out["ddp_10m"] = ddp_large.get("skipped", "ran") if ddp_large else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows, fewer steps")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--child", choices=("ps", "ddp"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rows, args.steps)
        return
    started = time.time()
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    ps_steps, ddp_steps = (15, 6) if args.quick else (60, 12)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"sparse_embeddings_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sizes:
        for kind in ("ps", "ddp"):
            if kind == "ddp" and size == 100_000:
                continue  # the 100k run is the parameter server's RSS baseline
            row = run(kind, size, ps_steps if kind == "ps" else ddp_steps, scratch)
            print(f"[sparse] {size:,} rows, {row['strategy']}: {json.dumps(row)}", flush=True)
            rows.append(row)
    table = markdown_table(rows)
    result = {"goals": goals(rows)}
    sys.stdout.write(table + "\n" + json.dumps(result, indent=1) + "\n")
    if args.out:
        doc = {
            "benchmark": "sparse_embeddings",
            "title": TITLE,
            "params": {"dim": DIM, "columns": COLUMNS, "batch": BATCH, "workers": WORKERS, "servers": SERVERS},
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
