"""Where the two gradient norms of a step come from: one process, DDP, or the strategy itself (torch only).

Each source turns one optimizer step into a :class:`PendingSample`, a tensor on the gradients' device (no host
sync per step); the callback reads a batch of them back now and then as
:class:`~lightning_patterns.adaptive.noise_scale.GradientNormSample` s.

- :class:`ConsecutiveSteps` (one process, no accumulation): the gradients of steps ``t − 1`` and ``t``. Keeps one
  flattened copy of the gradient (one model's worth of memory).
- :class:`MicroBatches` (one process, ``K ≥ 2`` micro-batches per step): each micro-batch's gradient, seen by a
  hook on every parameter as the backward pass produces it, and the accumulated one. Lightning divides the loss
  by ``K``, so a hook sees ``g_i / K``.
- :class:`DDPCommHook` (DDP, ``R ≥ 2`` ranks): a communication hook wraps DDP's all-reduce; it takes each bucket's
  local squared norm before averaging, and one extra all-reduce of two numbers per step averages them over ranks.

Under a ``GradScaler`` (16-bit mixed precision) the hooks see scaled gradients; they are divided by the scale
squared. The averaged gradient is read after Lightning unscales it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_patterns.adaptive.noise_scale import GradientNormSample

__all__ = ["ConsecutiveSteps", "DDPCommHook", "MicroBatches", "PendingSample", "gradient_sqr"]


@dataclass(frozen=True)
class PendingSample:
    """One step's measurement before it is read back.

    Attributes:
        step: the optimizer step (``trainer.global_step`` before it was taken).
        values: a float64 tensor ``[mean_i |g_i|², |ḡ|², mean_i 1/b_i]`` over the ``count`` measured gradients.
        count: ``n``, how many gradients ``ḡ`` averages.
    """

    step: int
    values: torch.Tensor
    count: int

    def read(self) -> GradientNormSample:
        """The sample on the host (a device sync)."""
        small_sqr, big_sqr, inverse_batch = self.values.tolist()
        return GradientNormSample(small_sqr, 1.0 / inverse_batch, big_sqr, self.count / inverse_batch)


def _gradients(parameters: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach() for p in parameters if p.grad is not None]


def gradient_sqr(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """``Σ |p.grad|²`` over ``parameters`` as a float64 scalar tensor (``0`` when none has a gradient)."""
    grads = _gradients(parameters)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return norms.double().square().sum()


def _pack(small: torch.Tensor, big: torch.Tensor, inverse_batch: torch.Tensor | float) -> torch.Tensor:
    return torch.stack([small.double(), big.double().to(small.device), small.new_tensor(inverse_batch).double()])


class ConsecutiveSteps:
    """The gradients of two consecutive steps, as two measurements of ``|G|²`` (overlapping pairs)."""

    name: ClassVar[str] = "consecutive_steps"

    def __init__(self) -> None:
        self._previous: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (flat gradient, its sqr, batch)

    def measure(self, step: int, parameters: Iterable[nn.Parameter], batch_size: int) -> PendingSample | None:
        """Record this step's gradient; with the previous one, return their two norms."""
        grads = _gradients(parameters)
        if not grads or batch_size < 1:
            self._previous = None
            return None
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        sqr = torch.dot(flat, flat)
        pending = None
        if self._previous is not None and self._previous[0].shape == flat.shape:
            previous, previous_sqr, previous_batch = self._previous
            cross = torch.dot(flat, previous)
            small = (sqr + previous_sqr) / 2
            big = (sqr + previous_sqr + 2 * cross) / 4
            pending = PendingSample(step, _pack(small, big, (1 / batch_size + 1 / previous_batch) / 2), 2)
        self._previous = (flat, sqr, batch_size)
        return pending

    def reset(self) -> None:
        """Forget the previous step (its parameters are no longer the ones before this step)."""
        self._previous = None


class MicroBatches:
    """Per-micro-batch gradient norms from parameter hooks, for steps of ``K ≥ 2`` accumulated micro-batches."""

    name: ClassVar[str] = "micro_batches"

    def __init__(self, parameters: Iterable[nn.Parameter], loss_scale: Callable[[], float]) -> None:
        self._loss_scale = loss_scale
        self._sqrs: list[torch.Tensor] = []
        self._batches: list[int] = []
        self._handles = [
            p.register_hook(self._on_gradient)  # type: ignore[no-untyped-call]
            for p in parameters
            if p.requires_grad
        ]

    def _on_gradient(self, grad: torch.Tensor) -> None:
        if self._sqrs:
            self._sqrs[-1] = self._sqrs[-1] + torch.linalg.vector_norm(grad, dtype=torch.float32).double().square()

    def begin_micro_batch(self, batch_size: int, device: torch.device) -> None:
        """A micro-batch of ``batch_size`` samples starts: its backward pass adds to a fresh total."""
        self._sqrs.append(torch.zeros((), dtype=torch.float64, device=device))
        self._batches.append(batch_size)

    def measure(self, step: int, parameters: Iterable[nn.Parameter], accumulation: int) -> PendingSample | None:
        """The step's two norms, if exactly ``accumulation ≥ 2`` full micro-batches made it (else ``None``)."""
        sqrs, batches = self._sqrs, self._batches
        self._sqrs, self._batches = [], []
        if accumulation < 2 or len(sqrs) != accumulation or min(batches) < 1:
            return None
        # Lightning divides each micro-batch's loss by K: undo it, and the loss scale, to get |g_i|².
        factor = (accumulation / self._loss_scale()) ** 2
        small = torch.stack(sqrs).mean() * factor
        inverse_batch = sum(1 / b for b in batches) / len(batches)
        return PendingSample(step, _pack(small, gradient_sqr(parameters), inverse_batch), accumulation)

    def remove(self) -> None:
        """Remove the parameter hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DDPCommHook:
    """A DDP communication hook: the default all-reduce, plus each bucket's local squared norm before it.

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
        self._local: torch.Tensor | None = None
        try:
            ddp.register_comm_hook(state=self, hook=_recording_allreduce)
        except RuntimeError as error:
            raise RuntimeError(
                "GradientNoiseScale measures under DDP with a communication hook, but this DistributedDataParallel "
                f"model already has one ({error}). Remove `ddp_comm_hook` from `DDPStrategy(...)`, or drop the "
                "GradientNoiseScale/AdaptiveBatchSize callback."
            ) from error

    def add_local(self, sqr: torch.Tensor) -> None:
        """Add one bucket's local squared norm (called by the hook during the backward pass)."""
        self._local = sqr if self._local is None else self._local + sqr

    def measure(self, step: int, parameters: Iterable[nn.Parameter], local_batch: int) -> PendingSample | None:
        """The step's two norms: ranks' mean local ``|g_r|²`` (one small all-reduce) and ``|ḡ|²`` of the average."""
        local, self._local = self._local, None
        if local is None or local_batch < 1:  # no synchronising backward pass this step
            return None
        world_size = dist.get_world_size(self._group)
        # Ranks' batches may differ (the last one of an epoch): average 1/b with the norms, in one all-reduce.
        packed = torch.stack([local / self._loss_scale() ** 2, local.new_tensor(1.0 / local_batch)])
        dist.all_reduce(packed, group=self._group)
        packed = packed / world_size
        return PendingSample(step, _pack(packed[0], gradient_sqr(parameters), packed[1]), world_size)


def _recording_allreduce(state: DDPCommHook, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.add_local(torch.linalg.vector_norm(buffer, dtype=torch.float32).double().square())
    return allreduce_hook(state._group, bucket)


# DDP checks a hook's annotations as objects; postponed annotations (strings) would fail the check.
_recording_allreduce.__annotations__ = {
    "state": DDPCommHook,
    "bucket": getattr(dist, "GradBucket"),  # noqa: B009 (torch does not export it to type checkers)
    "return": torch.futures.Future[torch.Tensor],
}
