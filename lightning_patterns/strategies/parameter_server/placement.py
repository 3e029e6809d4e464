"""Update placements, the server's side: what a server holds for one fit and what it does with a round's gradient.

- ``"worker"`` (:class:`GradientSum`, BytePS's placement): the server holds only a gradient buffer; it hands
  each worker the average of the workers' gradients of its chunks, and every worker runs the module's own
  optimizer on it. Exact for every optimizer, scheduler, loss scaler and clipping, as DDP is.
- ``"server"`` (:class:`ServerOptimizer`, the book's and ps-lite's placement): the server holds its chunks of
  the parameters and the optimizer state, and updates them; workers pull parameters and hold no optimizer state.
  Only element-wise optimizers (``optimizers.ELEMENTWISE_OPTIMIZERS``) split into chunks exactly.

The round itself (who pushed, when a round is complete, staleness) is the server's business
(:mod:`~lightning_patterns.strategies.parameter_server.server`); a placement sees the round's summed gradient
(each worker divides its gradient by the number of workers before pushing, as DDP's reducer does).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch

from lightning_patterns._registry import Registry
from lightning_patterns.strategies.parameter_server.messages import (
    DTYPES,
    ProtocolError,
    decode_json,
    pack_tensors,
    unpack_tensors,
)
from lightning_patterns.strategies.parameter_server.optimizers import ELEMENTWISE_OPTIMIZERS, HyperparameterLayout

__all__ = ["Allocate", "FitSpec", "GradientSum", "PLACEMENTS", "Placement", "RoundInputs", "ServerOptimizer"]

#: Sums its arguments over all servers (each server passes its own values).
Exchange = Callable[[list[float]], list[float]]
#: Gives a flat, zeroed buffer of ``numel`` elements of ``dtype`` (in shared memory when workers read it there).
Allocate = Callable[[int, torch.dtype], torch.Tensor]


def _private(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype)


@dataclass(frozen=True)
class FitSpec:
    """A fit as rank 0 describes it to one server in ``INIT``.

    Attributes:
        placement: a key of :data:`PLACEMENTS`.
        sync: whether updates are synchronous rounds of all workers.
        max_staleness: the stale-synchronous bound in async mode (``None``: unbounded).
        timeout: seconds a worker the server waits for may stay silent.
        dtype: the parameters' dtype.
        chunk_numels: elements of each of the server's chunks, in payload order.
        optimizer: ``"server"`` placement: the optimizer's registry name.
        groups: ``"server"`` placement: each param group's hyperparameters.
        chunk_groups: ``"server"`` placement: the param group of each chunk.
        hyperparameters: ``"server"`` placement: the :class:`HyperparameterLayout` of later updates, as JSON.
        buckets: elements of each of the server's buckets, in offset order (they cover its chunks).
        transport: the transport the workers asked for: ``"auto"``, ``"shm"`` or ``"tcp"``.
    """

    placement: str
    sync: bool
    max_staleness: int | None
    timeout: float
    dtype: torch.dtype
    chunk_numels: list[int]
    optimizer: str = ""
    groups: list[dict[str, Any]] = field(default_factory=list)
    chunk_groups: list[int] = field(default_factory=list)
    hyperparameters: list[list[Any]] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    transport: str = "auto"

    @property
    def numel(self) -> int:
        """Elements of all the server's chunks."""
        return sum(self.chunk_numels)

    def to_json(self) -> dict[str, Any]:
        """The description sent in ``INIT``."""
        return {
            "placement": self.placement,
            "sync": self.sync,
            "max_staleness": self.max_staleness,
            "timeout": self.timeout,
            "dtype": str(self.dtype).removeprefix("torch."),
            "chunk_numels": self.chunk_numels,
            "optimizer": self.optimizer,
            "groups": self.groups,
            "chunk_groups": self.chunk_groups,
            "hyperparameters": self.hyperparameters,
            "buckets": self.buckets,
            "transport": self.transport,
        }

    @classmethod
    def from_payload(cls, payload: torch.Tensor, sender: int) -> FitSpec:
        """Parse and check the ``INIT`` JSON from ``sender``; :class:`ProtocolError` if it is not a valid spec."""
        what = f"INIT from rank {sender}"
        obj = decode_json(payload, what)
        dtypes = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
        try:
            staleness = obj["max_staleness"]
            spec = cls(
                placement=str(obj["placement"]),
                sync=bool(obj["sync"]),
                max_staleness=None if staleness is None else int(staleness),
                timeout=float(obj["timeout"]),
                dtype=dtypes[obj["dtype"]],
                chunk_numels=[int(n) for n in obj["chunk_numels"]],
                optimizer=str(obj["optimizer"]),
                groups=[dict(g) for g in obj["groups"]],
                chunk_groups=[int(g) for g in obj["chunk_groups"]],
                hyperparameters=[list(s) for s in obj["hyperparameters"]],
                buckets=[int(n) for n in obj["buckets"]],
                transport=str(obj["transport"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"{what} is not a valid fit description: {error!r}.") from None
        if spec.placement not in PLACEMENTS:
            raise ProtocolError(f"{what} names placement {spec.placement!r}; expected one of {PLACEMENTS.names()}.")
        if any(n < 0 for n in spec.chunk_numels) or not spec.timeout > 0:
            raise ProtocolError(f"{what} has negative chunk sizes or a timeout that is not positive.")
        if any(n < 1 for n in spec.buckets) or sum(spec.buckets) != spec.numel:
            raise ProtocolError(f"{what} has buckets {spec.buckets} that do not cover its {spec.numel} elements.")
        if spec.transport not in ("auto", "shm", "tcp"):
            raise ProtocolError(f"{what} names transport {spec.transport!r}; expected 'auto', 'shm' or 'tcp'.")
        return spec


@dataclass(frozen=True)
class RoundInputs:
    """What the workers asked of one update, beyond the gradient.

    Attributes:
        present: one ``bool`` per chunk: whether any worker had a gradient for it.
        hyperparameters: the param groups' numeric hyperparameters (``"server"`` placement).
        clip_value: clip the averaged gradient to this (``0``: no clipping).
        clip_norm: clip by the norm over all servers' chunks (else each value).
        check_finite: skip the update on every server if the averaged gradient has inf or NaN.
        mean_loss: the workers' mean loss.
        exchange: sums a few numbers over all servers (for norms and the inf/NaN check).
        unscale: multiply the averaged gradient by this first (a GradScaler's inverse scale).
    """

    present: torch.Tensor
    hyperparameters: torch.Tensor | None = None
    clip_value: float = 0.0
    clip_norm: bool = True
    check_finite: bool = False
    mean_loss: float = 0.0
    exchange: Exchange | None = None
    unscale: float = 1.0


class Placement(ABC):
    """The server's side of an update placement, for one fit.

    Args:
        spec: the fit.
        values: the initial values of the server's chunks (placements that hold parameters), else ``None``.
        allocate: gives the buffer the server's replies are sent from (:attr:`reply`), in shared memory when
            workers of its host read them there (``None``: private memory).
    """

    name: ClassVar[str]
    #: Whether the server holds parameters (workers pull them) rather than only averaging gradients.
    holds_parameters: ClassVar[bool]

    def __init__(self, spec: FitSpec, values: torch.Tensor | None, allocate: Allocate | None = None) -> None:
        self.spec = spec
        #: The round's gradient: the server sums the workers' pushes into it.
        self.grad = torch.zeros(spec.numel, dtype=spec.dtype)

    @property
    @abstractmethod
    def reply(self) -> torch.Tensor:
        """The flat buffer the server answers from: the averaged gradient, or the parameters."""

    @abstractmethod
    def update(self, grad: torch.Tensor, inputs: RoundInputs) -> bool:
        """Use one round's (or, async, one push's) averaged gradient ``grad``; return whether it was skipped."""


class GradientSum(Placement):
    """``"worker"``: the server only averages gradients; the workers' optimizers apply them."""

    name = "worker"
    holds_parameters = False

    def __init__(self, spec: FitSpec, values: torch.Tensor | None, allocate: Allocate | None = None) -> None:
        super().__init__(spec, values, allocate)
        if not spec.sync:
            raise ProtocolError(
                "INIT asks for update_on='worker' with asynchronous updates, which it does not support."
            )
        # The average is summed where the workers read it.
        self.grad = (allocate or _private)(spec.numel, spec.dtype)

    @property
    def reply(self) -> torch.Tensor:
        """The averaged gradient."""
        return self.grad

    def update(self, grad: torch.Tensor, inputs: RoundInputs) -> bool:
        """Nothing to do: the averaged gradient is the reply."""
        return False


class ServerOptimizer(Placement):
    """``"server"``: the server holds its chunks of the parameters and runs the (element-wise) optimizer on them."""

    name = "server"
    holds_parameters = True

    def __init__(self, spec: FitSpec, values: torch.Tensor | None, allocate: Allocate | None = None) -> None:
        super().__init__(spec, values, allocate)
        if values is None or values.numel() != spec.numel or values.dtype != spec.dtype:
            raise ProtocolError(f"INIT for update_on='server' must carry the {spec.numel} initial parameter values.")
        if len(spec.chunk_groups) != len(spec.chunk_numels) or not all(
            0 <= g < len(spec.groups) for g in spec.chunk_groups
        ):
            raise ProtocolError("INIT gives a param group to each chunk that does not match its param groups.")
        try:
            optimizer_class = ELEMENTWISE_OPTIMIZERS.get(spec.optimizer)
        except KeyError as error:
            raise ProtocolError(f"INIT names an optimizer the servers do not run: {error.args[0]}") from None
        # The parameters live where the workers read them.
        self.flat = (allocate or _private)(spec.numel, spec.dtype)
        self.flat.copy_(values)
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        groups: list[dict[str, Any]] = [{**hp, "params": []} for hp in spec.groups]
        #: Where each chunk starts in the flat buffers (one more entry: the end).
        self.offsets = [0]
        offset = 0
        for numel, group in zip(spec.chunk_numels, spec.chunk_groups, strict=True):
            # A detached view is a leaf that shares storage with `flat`: the optimizer updates `flat` in place.
            param = self.flat[offset : offset + numel].detach().requires_grad_(True)
            self.grads.append(self.grad[offset : offset + numel])
            groups[group]["params"].append(param)
            self.params.append(param)
            offset += numel
            self.offsets.append(offset)
        # The param groups carry every hyperparameter, so the constructor's defaults do not matter.
        self.optimizer: torch.optim.Optimizer = cast(Any, optimizer_class)(groups)
        self.layout = HyperparameterLayout.from_json(spec.hyperparameters)
        self.initial_hyperparameters = self.layout.vector(self.optimizer.param_groups)
        self.version = 0

    @property
    def reply(self) -> torch.Tensor:
        """The parameters."""
        return self.flat

    def needs_whole_gradient(self, inputs: RoundInputs) -> bool:
        """Whether the update depends on the whole averaged gradient (norm clipping, the inf check)."""
        return inputs.check_finite or (inputs.clip_value > 0 and inputs.clip_norm)

    def update(self, grad: torch.Tensor, inputs: RoundInputs) -> bool:
        """Clip, check and apply ``grad`` as DDP's worker would apply the all-reduced gradient."""
        if grad is not self.grad:
            self.grad.copy_(grad)
        if inputs.unscale != 1.0:
            self.grad.mul_(inputs.unscale)
        if self.needs_whole_gradient(inputs):
            local = [float(torch.linalg.vector_norm(self.grad, 2, dtype=torch.float64)) ** 2]
            local.append(float((~torch.isfinite(self.grad)).sum()))
            square_norm, nonfinite = inputs.exchange(local) if inputs.exchange is not None else local
            if inputs.check_finite and (nonfinite > 0 or not math.isfinite(square_norm)):
                return True  # GradScaler: skip the step everywhere
            if inputs.clip_value > 0 and inputs.clip_norm:
                # torch.nn.utils.clip_grad_norm_: scale by max_norm / (total_norm + 1e-6), at most 1.
                coefficient = inputs.clip_value / (math.sqrt(square_norm) + 1e-6)
                if coefficient < 1.0:
                    self.grad.mul_(coefficient)
        self.begin_round(inputs)
        self.step_chunks(range(len(self.params)), inputs, unscaled=True)
        self.end_round()
        return False

    def begin_round(self, inputs: RoundInputs) -> None:
        """Take the round's hyperparameters (before stepping any chunk)."""
        if inputs.hyperparameters is not None:
            self.layout.apply(inputs.hyperparameters, self.optimizer.param_groups)

    def step_chunks(self, chunks: range, inputs: RoundInputs, unscaled: bool = False) -> None:
        """Apply the averaged gradient of ``chunks`` (a bucket: its gradient is summed, the rest need not be).

        Each chunk's optimizer state is its own, so stepping the buckets one after another equals one step of all.
        """
        grads = self.grad[self.offsets[chunks.start] : self.offsets[chunks.stop]]
        if inputs.unscale != 1.0 and not unscaled:
            grads.mul_(inputs.unscale)
        if inputs.clip_value > 0 and not inputs.clip_norm:
            grads.clamp_(-inputs.clip_value, inputs.clip_value)
        # Parameters that no worker had a gradient for are skipped, exactly as torch.optim skips `grad=None`.
        present = inputs.present.tolist()
        for index, param in enumerate(self.params):
            param.grad = self.grads[index] if index in chunks and present[index] else None
        self.optimizer.step()

    def end_round(self) -> None:
        """The round's update is complete."""
        self.version += 1

    def state(self) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """Each chunk's optimizer state, packed as JSON-able descriptions and bytes."""
        return pack_tensors([dict(self.optimizer.state.get(param, {})) for param in self.params])

    def load_state(self, described: Any, data: torch.Tensor, sender: int) -> None:
        """Load each chunk's optimizer state from a ``SET_STATE``."""
        entries = unpack_tensors(described, data, f"SET_STATE from rank {sender}")
        if len(entries) != len(self.params):
            raise ProtocolError(
                f"SET_STATE from rank {sender} has {len(entries)} chunks; this server holds {len(self.params)}."
            )
        for param, entry in zip(self.params, entries, strict=True):
            if entry:
                self.optimizer.state[param] = entry


#: Update placements by name (``ParameterServerStrategy(update_on=...)``).
PLACEMENTS: Registry[type[Placement]] = Registry("update placement")
for _placement in (GradientSum, ServerOptimizer):
    PLACEMENTS.register(_placement.name, _placement)
