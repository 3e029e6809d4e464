"""Where the two gradient norms of a step come from: one process, DDP, or the strategy itself (torch only).

Each source turns one optimizer step into a :class:`PendingSample`: a few norms stacked into one tensor on the
gradients' device, so a step costs a handful of kernels and never waits for the device. The callback reads many
steps back at once (:func:`read_back`, one device sync) and finishes the arithmetic on the host, giving
:class:`~lightning_patterns.adaptive.noise_scale.GradientNormSample` s.

- :class:`ConsecutiveSteps` (one process, no accumulation): the gradients ``g_t`` and ``g_(t-1)`` of two
  consecutive steps, from ``|g_t|²``, ``|g_(t-1)|²`` and ``g_t · g_(t-1)``, a pair every second step. Keeps one
  flattened copy of the gradient (one model's worth of memory).
- :class:`MicroBatches` (one process, ``K ≥ 2`` micro-batches per step): each micro-batch's gradient, as the
  change of the accumulated gradient over its backward pass, and the accumulated one. Lightning divides the loss
  by ``K``, so the accumulated gradient is the mean ``(g_1 + … + g_K) / K``.
- :class:`DDPCommHook` (DDP, ``R ≥ 2`` ranks): a communication hook wraps DDP's all-reduce and takes each bucket's
  local norm before averaging; one extra all-reduce of two numbers per step averages the squares over ranks.

Under a ``GradScaler`` (16-bit mixed precision) gradients are scaled until Lightning unscales them before the
optimizer step; the norms taken before that are divided by the scale squared (reading the scale waits for the
device once per micro-batch).
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
    """Each micro-batch's gradient, as the difference of the accumulated gradient before and after its backward pass.

    With ``K ≥ 2`` micro-batches per step Lightning accumulates ``a_i = (g_1 + … + g_i) / K`` in ``.grad``; at the
    end of each micro-batch the accumulated gradient is flattened and ``|a_i − a_(i-1)|² = |g_i|² / K²`` taken, so a
    micro-batch costs one flattening copy, a subtraction and a dot product, and the backward pass runs untouched.
    The previous copy is held meanwhile (one model's worth of memory).
    """

    name: ClassVar[str] = "micro_batches"

    def __init__(self, loss_scale: Callable[[], float]) -> None:
        self._loss_scale = loss_scale
        self._previous: torch.Tensor | None = None  # a_(i-1), flattened
        self._differences: list[torch.Tensor] = []  # |a_i − a_(i-1)|² per micro-batch so far
        self._scales: list[float] = []  # the loss scale each was taken under
        self._batches: list[int] = []

    def _difference(self, grads: list[torch.Tensor], unscale_previous: float = 1.0) -> torch.Tensor:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        previous = self._previous
        if previous is None:
            difference = torch.dot(flat, flat)
        else:
            delta = flat - (previous if unscale_previous == 1.0 else previous / unscale_previous)
            difference = torch.dot(delta, delta)
        self._previous = flat
        return difference

    def end_micro_batch(self, parameters: Iterable[nn.Parameter], batch_size: int) -> None:
        """A micro-batch that did not end the step finished its backward pass."""
        grads = _gradients(parameters)
        if not grads or (self._previous is not None and self._previous.numel() != sum(g.numel() for g in grads)):
            self.reset()
            return
        self._differences.append(self._difference(grads))
        self._scales.append(self._loss_scale())
        self._batches.append(batch_size)

    def measure(
        self, step: int, parameters: Iterable[nn.Parameter], batch_size: int, accumulation: int
    ) -> PendingSample | None:
        """At the step's last micro-batch: the step's norms, if exactly ``accumulation ≥ 2`` micro-batches made it."""
        grads = _gradients(parameters)
        complete = len(self._batches) == accumulation - 1 and accumulation >= 2 and grads and batch_size >= 1
        if not complete or (self._previous is not None and self._previous.numel() != sum(g.numel() for g in grads)):
            self.reset()
            return None
        # The step's last gradients are unscaled by now (Lightning unscales before this hook); the earlier copies
        # were taken under the loss scale, the same for the whole step.
        scale = self._scales[-1]
        differences = [*self._differences, self._difference(grads, unscale_previous=scale)]
        batches = [*self._batches, batch_size]
        scales = [*self._scales, 1.0]
        last = self._previous
        assert last is not None  # set by _difference
        total = torch.dot(last, last)
        self.reset()
        inverse_batch = sum(1 / b for b in batches) / len(batches)
        k = accumulation

        def finish(v: Sequence[float]) -> tuple[float, float, float]:
            micro = [d * k * k / (s * s) for d, s in zip(v[:-1], scales, strict=True)]
            return sum(micro) / k, v[-1], inverse_batch

        return PendingSample(step, torch.stack([*differences, total]), accumulation, finish)

    def reset(self) -> None:
        """Drop a partial step (an epoch's last, short one, or a change of parameters)."""
        self._previous = None
        self._differences, self._scales, self._batches = [], [], []


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

    def reset(self) -> None:
        """Drop the bucket norms of a step that is not measured."""
        self._local = []

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
