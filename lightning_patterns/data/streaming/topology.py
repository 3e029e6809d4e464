"""Who am I in the job, at run time: rank and world size for a streaming dataset, and which DataLoader worker.

Inside a Trainer the DataModule hands the strategy's ``global_rank`` and ``world_size`` to the dataset.
Outside one, an initialised ``torch.distributed`` process group answers, then the ``RANK`` /
``WORLD_SIZE`` environment variables that torchrun and SLURM wrappers set, then a single process. The
values are checked by :func:`~lightning_patterns.data.sharding.topology.check_rank`, as every rank is.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from torch.utils.data import get_worker_info

from lightning_patterns.data.sharding.topology import check_rank

__all__ = ["current_worker", "resolve_rank", "trainer_rank_and_world_size"]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable {name}={value!r} is not an integer.") from None


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The ``(rank, world_size)`` to shard for: given values, else torch.distributed, else env vars, else ``(0, 1)``."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError(f"Give both rank and world_size or neither, got rank={rank}, world_size={world_size}.")
        check_rank(rank, world_size, "the arguments")
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        env_rank = _env_int("RANK") if "RANK" in os.environ else 0
        env_world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
        check_rank(env_rank, env_world, "the RANK and WORLD_SIZE environment variables")
        return env_rank, env_world
    return 0, 1


def current_worker() -> tuple[int, int]:
    """``(num_workers, worker_id)`` of the DataLoader worker running this code; ``(0, 0)`` in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 0
    return info.num_workers, info.id


def trainer_rank_and_world_size(trainer: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of the data-parallel replicas: the strategy's sampler kwargs, else :func:`resolve_rank`.

    Args:
        trainer: the Lightning ``Trainer`` a DataModule is attached to, or ``None`` outside one. The
            parameter-server strategy names only its workers in ``distributed_sampler_kwargs``, so data never
            goes to servers.
    """
    if trainer is not None:
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
        if kwargs:
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return 0, 1
    return resolve_rank(None, None)
