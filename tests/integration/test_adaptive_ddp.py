"""GradientNoiseScale / AdaptiveBatchSize under DDP: one real 2-process launch (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.testing.launch import free_port, launch_env, torchrun_command

SCRIPT = Path(__file__).parent / "scripts" / "adaptive_ddp.py"
N = 640


class _Samples:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, object]:
        image = (np.random.default_rng(i).normal(size=(4, 4)) + i % 4).astype(np.float32)
        return {"index": np.int64(i), "image": image, "label": np.int64(i % 4)}


@pytest.mark.slow
@pytest.mark.distributed
def test_noise_scale_and_batch_size_under_ddp(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    write_dataset(_Samples(), url, num_shards=3, progress=False)
    port = free_port()
    result = subprocess.run(
        [*torchrun_command(port, nproc=2), str(SCRIPT), str(tmp_path), url],
        env=launch_env(port),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in ranks:
        assert record["world_size"] == 2
        # Measured by the communication hook around DDP's all-reduce: each rank's local gradient and the average.
        assert record["source"] == "ddp"
        exact = record["exact"]
        for key in ("grad_sqr", "grad_var", "noise_scale"):
            assert record[key] == pytest.approx(exact[key], rel=0.15), key
        assert record["base_batch_size"] == 32  # 2 ranks × 16
        # min_batch_size=64 forces the first decision (step 100) to 64, taken from the next epoch on.
        assert [d["batch_size"] for d in record["decisions"]] == [64]
        assert record["decisions"][0]["step"] == 100
        # A hook already on the DDP model: the callback says what to remove.
        assert "already has one" in record["hook_error"]
        assert "Remove `ddp_comm_hook`" in record["hook_error"]
    # Every rank measured the same averaged norms and switched at the same step to the same configuration.
    assert ranks[0]["noise_scale"] == ranks[1]["noise_scale"]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    micro, accumulation = ranks[0]["decisions"][0]["micro_batch_size"], ranks[0]["decisions"][0]["accumulation"]
    by_epoch = Counter((epoch, size, k) for epoch, size, k in ranks[0]["steps"])
    assert by_epoch[(0, 16, 1)] == 4096 // 32
    assert all((size, k) == (micro, accumulation) for epoch, size, k in ranks[0]["steps"] if epoch >= 1)

    # Streamed: the batch size changed in the middle of the first epoch, at the same batch on both ranks.
    streamed = [record["streamed"] for record in ranks]
    decision = streamed[0]["decisions"][0]
    micro = decision["micro_batch_size"]
    assert (micro, decision["accumulation"]) == (32, 1)  # 2 ranks × 32 = 64
    switches = [next(row[1] for row in record["rows"] if row[2] != 16) for record in streamed]
    assert switches[0] == switches[1]
    per_rank_epoch = [[row for row in record["rows"] if row[0] == 0] for record in streamed]
    assert 0 < switches[0] < len(per_rank_epoch[0]) - 1
    assert len(per_rank_epoch[0]) == len(per_rank_epoch[1])
    assert all(row[2] == micro for rows in per_rank_epoch for row in rows[switches[0] : -1])
    for epoch in (0, 1):
        seen = Counter(i for record in streamed for row in record["rows"] if row[0] == epoch for i in row[4])
        assert seen == Counter(range(N)), f"epoch {epoch}: each sample once across both ranks"
    # Resumed from a checkpoint after the change: the new batch size, and the rest of the epoch, each sample once.
    saved_at = streamed[0]["saved_at"]
    done = [i for record in streamed for row in record["before"] if row[1] <= saved_at for i in row[4]]
    rest = [i for record in streamed for row in record["resumed"] for i in row[4]]
    assert Counter(done + rest) == Counter(range(N))
    for record in streamed:
        assert record["resumed_config"] == [micro, 1]
        assert record["resumed"][0][1] == saved_at + 1
        assert all(row[2] == micro for row in record["resumed"][:-1])
