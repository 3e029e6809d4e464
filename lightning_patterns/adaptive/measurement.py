"""Where the two gradient norms of a step come from: one process, DDP, or the strategy itself (torch only).

Each source turns one optimizer step into a :class:`PendingSample`: a few norms stacked into one tensor on the
gradients' device, so a step costs a handful of kernels and never waits for the device. The callback reads many
steps back at once (:func:`read_back`, one device sync) and finishes the arithmetic on the host, giving
:class:`~lightning_patterns.adaptive.noise_scale.GradientNormSample` s.

- :class:`ConsecutiveSteps` (one process, no accumulation): the gradients ``g_t`` and ``g_(t-1)`` of two
  consecutive steps, from ``|g_t|²``, ``|g_(t-1)|²`` and ``g_t · g_(t-1)``, a pair every second step. Keeps one
  flattened copy of the gradient (one model's worth of memory).
- :class:`MicroBatches` (one process, ``K ≥ 2`` micro-batches per step): each micro-batch's gradient, whose
  per-parameter norms a hook on every parameter takes as the backward pass produces them, and the accumulated one.
  Lightning divides the loss by ``K``, so a hook sees ``g_i / K``.
- :class:`DDPCommHook` (DDP, ``R ≥ 2`` ranks): a communication hook wraps DDP's all-reduce and takes each bucket's
  local norm before averaging; one extra all-reduce of two numbers per step averages the squares over ranks.

Under a ``GradScaler`` (16-bit mixed precision) the hooks see scaled gradients; they are divided by the scale
squared. The averaged gradient is read after Lightning unscales it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_patterns.adaptive.noise_scale import GradientNormSample

__all__ = ["ConsecutiveSteps", "DDPCommHook", "MicroBatches", "PendingSample", "read_back"]

#: Host-side finish of a :class:`PendingSample`: its values → ``(mean_i |g_i|², |ḡ|², mean_i 1/b_i)``.
Finish = Callable[[Sequence[float]], tuple[float, float, float]]


@dataclass(frozen=True)
class PendingSample:
    """One step's measurement before it is read back.

    Attributes:
        step: the optimizer step (``trainer.global_step`` before it was taken).
        values: norms on the device, laid out as the source that made it chose.
        count: ``n``, how many gradients ``ḡ`` averages.
        finish: turns ``values`` (on the host) into ``(mean_i |g_i|², |ḡ|², mean_i 1/b_i)``.
    """

    step: int
    values: torch.Tensor
    count: int
    finish: Finish


def read_back(pending: Sequence[PendingSample]) -> list[GradientNormSample]:
    """The samples of many steps, read from the device at once."""
    if not pending:
        return []
    flat = torch.cat([p.values.reshape(-1).double().cpu() for p in pending]).tolist()
    samples, offset = [], 0
    for p in pending:
        size = p.values.numel()
        small_sqr, big_sqr, inverse_batch = p.finish(flat[offset : offset + size])
        offset += size
        samples.append(GradientNormSample(small_sqr, 1.0 / inverse_batch, big_sqr, p.count / inverse_batch))
    return samples


def _gradients(parameters: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach() for p in parameters if p.grad is not None]


def _norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


def _sum_of_squares(values: Sequence[float]) -> float:
    return sum(v * v for v in values)


class ConsecutiveSteps:
    """The gradients of two consecutive steps, as two measurements of ``|G|²``.

    Pairs do not overlap (steps 1-2, 3-4, ...): each gradient is used once, and a step costs on average one
    flattening copy and one and a half dot products.
    """

    name: ClassVar[str] = "consecutive_steps"

    def __init__(self) -> None:
        self._previous: tuple[torch.Tensor, torch.Tensor, int] | None = None  # flat gradient, its sqr, its batch

    def measure(self, step: int, parameters: Iterable[nn.Parameter], batch_size: int) -> PendingSample | None:
        """Keep the first gradient of a pair; at the second, return the pair's norms."""
        grads = _gradients(parameters)
        if not grads or batch_size < 1:
            self._previous = None
            return None
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        sqr = torch.dot(flat, flat)
        if self._previous is None or self._previous[0].shape != flat.shape:
            self._previous = (flat, sqr, batch_size)
            return None
        previous, previous_sqr, previous_batch = self._previous
        self._previous = None
        inverse_batch = (1 / batch_size + 1 / previous_batch) / 2

        def finish(v: Sequence[float]) -> tuple[float, float, float]:
            now, before, cross = v
            return (now + before) / 2, (now + before + 2 * cross) / 4, inverse_batch

        return PendingSample(step, torch.stack([sqr, previous_sqr, torch.dot(flat, previous)]), 2, finish)

    def reset(self) -> None:
        """Forget a pair's first gradient (its parameters are no longer the ones before this step)."""
        self._previous = None


class MicroBatches:
    """Per-micro-batch gradient norms from parameter hooks, for steps of ``K ≥ 2`` accumulated micro-batches."""

    name: ClassVar[str] = "micro_batches"

    def __init__(self, parameters: Iterable[nn.Parameter], loss_scale: Callable[[], float]) -> None:
        self._loss_scale = loss_scale
        self._norms: list[list[torch.Tensor]] = []  # per micro-batch: the norm of each parameter's gradient
        self._batches: list[int] = []
        self._handles = [
            p.register_hook(self._on_gradient)  # type: ignore[no-untyped-call]
            for p in parameters
            if p.requires_grad
        ]

    def _on_gradient(self, grad: torch.Tensor) -> None:
        if self._norms:
            self._norms[-1].append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def begin_micro_batch(self, batch_size: int) -> None:
        """A micro-batch of ``batch_size`` samples starts: its backward pass's norms go to a fresh list."""
        self._norms.append([])
        self._batches.append(batch_size)

    def measure(self, step: int, parameters: Iterable[nn.Parameter], accumulation: int) -> PendingSample | None:
        """The step's norms, if exactly ``accumulation ≥ 2`` full micro-batches made it (else ``None``)."""
        norms, batches = self._norms, self._batches
        self._norms, self._batches = [], []
        if accumulation < 2 or len(norms) != accumulation or min(batches) < 1 or not all(norms):
            return None
        sizes = [len(n) for n in norms]
        # Lightning divides each micro-batch's loss by K: undo it, and the loss scale, to get |g_i|².
        factor = (accumulation / self._loss_scale()) ** 2
        inverse_batch = sum(1 / b for b in batches) / len(batches)

        def finish(v: Sequence[float]) -> tuple[float, float, float]:
            micro, start = [], 0
            for size in sizes:
                micro.append(_sum_of_squares(v[start : start + size]) * factor)
                start += size
            return sum(micro) / len(micro), _sum_of_squares(v[start:]), inverse_batch

        values = torch.stack([n for group in norms for n in group] + _norms(_gradients(parameters)))
        return PendingSample(step, values, accumulation, finish)

    def remove(self) -> None:
        """Remove the parameter hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DDPCommHook:
    """A DDP communication hook: the default all-reduce, plus each bucket's local norm before it.

    Args:
        ddp: the ``DistributedDataParallel`` module (``trainer.strategy.model``).
        loss_scale: the ``GradScaler`` scale of the current step (``1.0`` without one).

    Raises:
        RuntimeError: when ``ddp`` already has a communication hook (it can have only one).
    """

    name: ClassVar[str] = "ddp"

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, loss_scale: Callable[[], float]) -> None:
        self._group = ddp.process_group
        self._loss_scale = loss_scale
        self._local: list[torch.Tensor] = []
        try:
            ddp.register_comm_hook(state=self, hook=_recording_allreduce)
        except RuntimeError as error:
            raise RuntimeError(
                "GradientNoiseScale measures under DDP with a communication hook, but this DistributedDataParallel "
                f"model already has one ({error}). Remove `ddp_comm_hook` from `DDPStrategy(...)`, or drop the "
                "GradientNoiseScale/AdaptiveBatchSize callback."
            ) from error

    def add_local(self, norm: torch.Tensor) -> None:
        """Note one bucket's local norm (called by the hook during the backward pass)."""
        self._local.append(norm)

    def measure(self, step: int, parameters: Iterable[nn.Parameter], local_batch: int) -> PendingSample | None:
        """The step's norms: ranks' mean local ``|g_r|²`` (one small all-reduce) and the averaged gradient's."""
        local, self._local = self._local, []
        if not local or local_batch < 1:  # no synchronising backward pass this step
            return None
        world_size = dist.get_world_size(self._group)
        local_sqr = torch.stack(local).double().square().sum() / self._loss_scale() ** 2
        # Ranks' batches may differ (the last one of an epoch): average 1/b with the squares, in one all-reduce.
        packed = torch.stack([local_sqr, local_sqr.new_full((), 1.0 / local_batch)])
        dist.all_reduce(packed, group=self._group)

        def finish(v: Sequence[float]) -> tuple[float, float, float]:
            return v[0] / world_size, _sum_of_squares(v[2:]), v[1] / world_size

        values = torch.cat([packed, torch.stack(_norms(_gradients(parameters))).to(packed)])
        return PendingSample(step, values, world_size, finish)


def _recording_allreduce(state: DDPCommHook, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    state.add_local(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32))
    return allreduce_hook(state._group, bucket)


# DDP checks a hook's annotations as objects; postponed annotations (strings) would fail the check.
_recording_allreduce.__annotations__ = {
    "state": DDPCommHook,
    "bucket": getattr(dist, "GradBucket"),  # noqa: B009 (torch does not export it to type checkers)
    "return": torch.futures.Future[torch.Tensor],
}
