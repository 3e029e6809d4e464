"""`Topology` and `check_rank`: the one place a rank, world size or worker index is checked."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_patterns.data.sharding.topology import Topology, check_rank


def test_defaults_are_one_process() -> None:
    assert Topology() == Topology(world_size=1, rank=0, num_workers=0, worker_id=0)
    assert Topology(4, 3, 2, 1).worker_id == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, r"Expected world_size >= 1, got world_size=0; pass the number of processes"),
        ({"world_size": 2, "rank": 2}, r"Expected 0 <= rank < world_size, got rank=2 with world_size=2; pass the"),
        ({"world_size": 2, "rank": -1}, r"got rank=-1 with world_size=2"),
        ({"num_workers": -1}, r"Expected num_workers >= 0, got num_workers=-1; use 0 for the main process"),
        ({"num_workers": 2, "worker_id": 2}, r"0 <= worker_id < max\(num_workers, 1\), got worker_id=2 with num"),
        ({"num_workers": 0, "worker_id": 1}, r"got worker_id=1 with num_workers=0; pass `torch.utils.data.get_wo"),
    ],
)
def test_invalid_topologies_name_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_check_rank_says_where_the_values_came_from() -> None:
    check_rank(1, 2)
    with pytest.raises(ValueError, match=r"got rank=5 with world_size=2 \(from the RANK variable\); pass"):
        check_rank(5, 2, "the RANK variable")
    with pytest.raises(ValueError, match=r"got world_size=-1 \(from a test\); pass the number of processes"):
        check_rank(0, -1, "a test")
