"""Copies between a worker's tensors and the host memory its pushes and replies travel through.

A bucket's pieces (slices of gradients or parameters, each beside its slice of host memory) are copied by a
:class:`Copier`:

- :class:`HostCopier` (CPU tensors): at once, on the calling thread. Gradients are divided by the number of
  workers in the same pass (``torch.mul(..., out=...)``), so a push costs one read and one write of its bytes.
- :class:`CudaCopier` (CUDA tensors): on a side stream, from and to page-locked host memory (the shared regions,
  registered with CUDA, or pinned buffers), one copy per piece. A device-to-host copy starts once the compute
  stream has produced the gradient (an event recorded where backward made it); the caller waits for the copy's
  event before telling a server the data is there. A host-to-device copy waits for the work already queued on the
  compute stream (which may still read the old values), and the compute stream waits for the copy's event before
  anything reads the new values. Tensors read on the side stream are recorded on it, so the caching allocator
  cannot hand their memory out before the copy is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Copier", "CudaCopier", "HostCopier", "make_copier"]

#: A pair (source, destination) of flat tensors of equal size.
Piece = tuple[torch.Tensor, torch.Tensor]


class Copier(ABC):
    """Moves pieces of a bucket between the model's device and host memory."""

    #: Whether :meth:`to_host` may run on another thread than the one that waits for it (then a sender thread
    #: waits for the copies before announcing them, and backward never blocks on a copy).
    asynchronous: bool = False

    @abstractmethod
    def to_host(self, pieces: Sequence[Piece], scale: float) -> Any:
        """Copy device ``pieces`` to host, multiplied by ``scale``; return a ticket for :meth:`wait_host`."""

    @abstractmethod
    def wait_host(self, ticket: Any) -> None:
        """Block until the copies of ``ticket`` are in host memory."""

    @abstractmethod
    def to_device(self, pieces: Sequence[Piece]) -> Any:
        """Copy host ``pieces`` to the device; return a ticket for :meth:`order_after`."""

    @abstractmethod
    def order_after(self, ticket: Any) -> None:
        """Make whatever the caller does next on the device wait for the copies of ``ticket``."""

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat host buffer the copies are fast from and to."""
        return torch.empty(numel, dtype=dtype)


class HostCopier(Copier):
    """CPU tensors: every copy at once, on the calling thread."""

    def to_host(self, pieces: Sequence[Piece], scale: float) -> None:
        """Copy (and scale) now."""
        with torch.no_grad():
            for source, destination in pieces:
                if scale == 1.0:
                    destination.copy_(source)
                else:
                    torch.mul(source, scale, out=destination)

    def wait_host(self, ticket: Any) -> None:
        """Nothing to wait for."""

    def to_device(self, pieces: Sequence[Piece]) -> None:
        """Copy now."""
        with torch.no_grad():
            for source, destination in pieces:
                destination.copy_(source)

    def order_after(self, ticket: Any) -> None:
        """Nothing to order."""


class CudaCopier(Copier):
    """CUDA tensors: copies on a side stream, ordered against the compute stream with events.

    Args:
        device: the worker's CUDA device.
    """

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def to_host(self, pieces: Sequence[Piece], scale: float) -> torch.cuda.Event:
        """Queue device-to-host copies after the compute stream's work so far; the event marks their end."""
        produced = torch.cuda.Event()  # type: ignore[no-untyped-call]
        produced.record(torch.cuda.current_stream(self.device))
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.stream.wait_event(produced)
            for source, destination in pieces:
                source.record_stream(self.stream)
                data = source if scale == 1.0 else source * scale  # allocated on the side stream
                destination.copy_(data, non_blocking=True)
            done.record(self.stream)
        return done

    def wait_host(self, ticket: torch.cuda.Event) -> None:
        """Block until the copies reached host memory."""
        ticket.synchronize()

    def to_device(self, pieces: Sequence[Piece]) -> torch.cuda.Event:
        """Queue host-to-device copies after the compute stream's work so far; the event marks their end."""
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for source, destination in pieces:
                destination.record_stream(self.stream)
                destination.copy_(source, non_blocking=True)
            done.record(self.stream)
        return done

    def order_after(self, ticket: torch.cuda.Event) -> None:
        """The compute stream waits for the copies (the host does not)."""
        torch.cuda.current_stream(self.device).wait_event(ticket)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Page-locked host memory (copies from it run asynchronously, at full speed)."""
        return torch.empty(numel, dtype=dtype, pin_memory=True)


def make_copier(device: torch.device) -> Copier:
    """The copier for tensors on ``device``."""
    return CudaCopier(device) if device.type == "cuda" else HostCopier()
