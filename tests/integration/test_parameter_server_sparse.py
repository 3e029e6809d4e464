"""Sparse tables on the parameter servers, in real processes (2 workers, 1 and 2 servers, gloo).

One launch (``parameter_server_jobs.py sparse``) runs every fit; the tests compare its records with single-process
training of the same network computed here, check the ``ps/sparse_*`` counters against the unique rows of each
worker's batches, and load its checkpoint into a plain single-process Trainer.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_patterns.strategies.parameter_server.sparse import read_manifest
from lightning_patterns.testing.launch import free_port, launch_env

SCRIPT = Path(__file__).parent / "scripts" / "parameter_server_jobs.py"
_spec = importlib.util.spec_from_file_location("parameter_server_jobs", SCRIPT)
assert _spec is not None
assert _spec.loader is not None
jobs: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = jobs  # dataclasses look their module up there
_spec.loader.exec_module(jobs)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: Bytes of one message header (12 float64 values).
_HEADER = 96


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parameter_server_sparse")
    port = free_port()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "sparse", "--out", str(out)],
        env={**launch_env(port), "LIGHTNING_PATTERNS_LIGHTNING": "pytorch_lightning"},
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


def _worker_batches(rank: int) -> list[tuple[torch.Tensor, ...]]:
    """What ``DistributedSampler(shuffle=False)`` gives worker ``rank``, batch by batch."""
    data = jobs.sparse_data()
    indices = list(range(rank, len(data), jobs.WORKERS))
    batches = []
    for start in range(0, len(indices), jobs.SPARSE_BATCH):
        chunk = torch.tensor(indices[start : start + jobs.SPARSE_BATCH])
        batches.append(tuple(tensor[chunk] for tensor in data.tensors))
    return batches


def _single_process(optimizer_name: str, batches: tuple[int, ...] = (0, 1, 2, 3)) -> dict[str, torch.Tensor]:
    """The same network trained in one process on the global batches (the mean of the workers' mean losses)."""
    net = jobs.SparseNet()
    optimizer = jobs.sparse_optimizer(net, optimizer_name)
    per_worker = [_worker_batches(rank) for rank in range(jobs.WORKERS)]
    for step in batches:
        optimizer.zero_grad()
        losses = [F.mse_loss(net(users, items), target) for users, items, target in (b[step] for b in per_worker)]
        torch.stack(losses).mean().backward()
        optimizer.step()
    return {f"net.{key}": value.detach() for key, value in net.state_dict().items()}


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_sync_sparse_training_equals_single_process(sparse_runs: Path, optimizer: str, servers: int) -> None:
    expected = _single_process(optimizer)
    for rank in range(jobs.WORKERS):
        state = _load(sparse_runs / f"sparse_{optimizer}_s{servers}_rank{rank}.pt")["state_dict"]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    # The tables moved: the comparison is not of untrained weights.
    assert not torch.allclose(expected["net.items.weight"], jobs.SparseNet().items.weight)


@pytest.mark.parametrize("servers", [1, 2])
def test_sparse_bytes_per_step_are_the_unique_rows_pulled_and_pushed(sparse_runs: Path, servers: int) -> None:
    """``ps/sparse_bytes`` = pull + push of each table's unique rows (ids + rows × dim × 4) within 5 %."""
    net = jobs.SparseNet()
    dims = [net.users.embedding_dim, net.items.embedding_dim]
    for rank in range(jobs.WORKERS):
        history = _load(sparse_runs / f"sparse_sgd_s{servers}_rank{rank}.pt")["history"]
        assert len(history) == jobs.SPARSE_STEPS
        for step, (users, items, _) in enumerate(_worker_batches(rank)):
            unique = [users.unique().numel(), items.unique().numel()]
            rows, nbytes = history[step]
            assert rows == sum(unique)
            theory = sum(2 * n * (8 + dim * 4) for n, dim in zip(unique, dims, strict=True))
            assert abs(nbytes - theory) <= 0.05 * theory, (rank, step, nbytes, theory)
            # Exactly: the payloads, plus one header per pull, reply and push (pulls only to servers with rows).
            assert nbytes >= theory + 3 * _HEADER * len(unique)
            assert nbytes <= theory + 3 * _HEADER * len(unique) * servers


def test_async_sparse_pushes_are_each_applied_once_at_one_over_the_workers(sparse_runs: Path) -> None:
    """Async, staleness 1, rank 1 slowed: the servers applied every row gradient each worker pushed, once, at lr / W.

    SGD on rows is a sum, so whatever order the pushes arrived in, the final table is the initial one minus
    ``lr / W`` times the sum of all pushed row gradients (the gradients themselves saw stale rows: async).
    """
    net = jobs.SparseNet()
    expected = {"users": net.users.weight.detach().clone(), "items": net.items.weight.detach().clone()}
    lr = 0.5  # the tables' param group (jobs.sparse_optimizer)
    for rank in range(jobs.WORKERS):
        pushed = _load(sparse_runs / f"sparse_async_rank{rank}.pt")["pushed"]
        assert len(pushed) == jobs.SPARSE_STEPS
        for users, users_grad, items, items_grad in pushed:
            expected["users"].index_add_(0, users, users_grad, alpha=-lr / jobs.WORKERS)
            expected["items"].index_add_(0, items, items_grad, alpha=-lr / jobs.WORKERS)
    last = _load(sparse_runs / f"sparse_async_rank{jobs.WORKERS - 1}.pt")  # the slowed rank ends (gathers) last
    for name, table in expected.items():
        torch.testing.assert_close(last["state_dict"][f"net.{name}.weight"], table, rtol=0, atol=1e-5)
    assert not torch.allclose(expected["items"], net.items.weight)
    # It was asynchronous, within the bound: rank 1's dense pushes were stale, by at most (W - 1) × (1 + 1).
    assert 1 <= last["telemetry"].max_staleness_seen <= 2


def _sum_of_pushes(prefix: str) -> dict[str, torch.Tensor]:
    """The initial tables minus ``lr / W`` times every row gradient every worker pushed (SGD on rows is a sum)."""
    net = jobs.SparseNet()
    expected = {"users": net.users.weight.detach().clone(), "items": net.items.weight.detach().clone()}
    lr = 0.5  # the tables' param group (jobs.sparse_optimizer)
    for rank in range(jobs.WORKERS):
        pushed = _load(Path(f"{prefix}_rank{rank}.pt"))["pushed"]
        assert len(pushed) == jobs.SPARSE_STEPS
        for users, users_grad, items, items_grad in pushed:
            expected["users"].index_add_(0, users, users_grad, alpha=-lr / jobs.WORKERS)
            expected["items"].index_add_(0, items, items_grad, alpha=-lr / jobs.WORKERS)
    assert not torch.allclose(expected["items"], net.items.weight)
    return expected


def test_hybrid_sync_dense_async_sparse_applies_each_push_once_within_the_staleness_bound(sparse_runs: Path) -> None:
    """mode='sync', sparse_mode='async', sparse_max_staleness=1; rank 1's sparse pushes late (after its dense round).

    Every row gradient is applied once at lr / W (both workers' gathered tables: the end-of-fit gather waits for
    every push); rank 0's pulls did not wait for rank 1's pushes of the step before (staleness 1 seen), and never
    lacked older ones; the dense part stayed synchronous: the head is identical on both workers.
    """
    expected = _sum_of_pushes(str(sparse_runs / "sparse_hybrid"))
    records = [_load(sparse_runs / f"sparse_hybrid_rank{rank}.pt") for rank in range(jobs.WORKERS)]
    for record in records:
        for name, table in expected.items():
            torch.testing.assert_close(record["state_dict"][f"net.{name}.weight"], table, rtol=0, atol=1e-5)
    # Rank 0 pulled while rank 1's rows of the step before were still out (it did not wait), never more behind.
    assert records[0]["sparse_staleness"] == 1
    assert max(record["sparse_staleness"] for record in records) <= 1
    head = jobs.SparseNet().head.state_dict()
    for key, initial in head.items():
        assert torch.equal(records[0]["state_dict"][f"net.head.{key}"], records[1]["state_dict"][f"net.head.{key}"])
        assert not torch.equal(records[0]["state_dict"][f"net.head.{key}"], initial)


def test_checkpoint_of_two_servers_resumes_on_one_and_equals_uninterrupted_training(sparse_runs: Path) -> None:
    folder = sparse_runs / "sparse_ckpt" / "step2.ckpt.sparse"
    tables = read_manifest(folder)
    assert sorted(tables) == ["net.items", "net.users"]
    for table in tables.values():
        assert table.sharding.num_servers == 2
        assert len(table.shards) == 2
        assert table.step == 2
        for server in range(2):
            assert (folder / "sparse" / f"table-{table.index:03d}" / f"server-{server:05d}-of-00002").is_dir()
    # Two epochs of the first two batches: rows and Adagrad's row state must survive the re-sharding.
    expected = _single_process("adagrad", batches=(0, 1, 0, 1))
    resumed = _load(sparse_runs / "sparse_resumed_rank0.pt")["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_sparse_checkpoint_loads_into_a_plain_single_process_trainer(sparse_runs: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    checkpoint = sparse_runs / "sparse_ckpt" / "step2.ckpt"
    expected = _single_process("adagrad", batches=(0, 1))
    module = jobs.SparseModule("adagrad")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(jobs.sparse_data(), batch_size=jobs.SPARSE_BATCH)
    module.validation_step = lambda batch, batch_idx: module.training_step(batch, batch_idx)  # type: ignore[method-assign]
    trainer.validate(module, loader, ckpt_path=str(checkpoint))
    for key, value in expected.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_tables_built_in_configure_model_never_exist_on_a_worker(sparse_runs: Path) -> None:
    """EmbeddingCTR's 5,000-row table (over ``sparse_min_rows=1000``) stays meta; the 200-row one is dense."""
    for rank in range(jobs.WORKERS):
        record = _load(sparse_runs / f"sparse_ctr_rank{rank}.pt")
        assert record["items_is_meta"]
        assert not record["users_is_meta"]
        assert len(record["history"]) == 3
        assert all(rows > 0 and nbytes > rows * 8 * 4 * 2 for rows, nbytes in record["history"])
