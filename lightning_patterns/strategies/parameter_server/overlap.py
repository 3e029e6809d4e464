"""Parameters that arrive while the next step already runs: reading one waits for its own bucket, not the model.

With ``update_on="server"`` (sync), a worker commits its round and goes on (Lightning's loop, its callbacks, the
next batch, the next forward) while the servers update the parameters bucket by bucket, in the order the next
forward needs them. Until a bucket's reply is applied, its parameters hold last step's values, so every read of
one must wait for it, exactly there and no earlier.

Forward pre-hooks would wait per module, but a module's parameters are also read outside its forward (a tied
output projection ``x @ self.embedding.weight.T``, a regularizer in ``training_step``, a callback, a checkpoint).
:class:`PendingParameters` therefore intercepts every torch function (a ``TorchFunctionMode``, the mechanism
``torch.overrides`` documents for this) while any parameter is pending: a call that reads a pending parameter, or
a view of one, first waits for that parameter's buckets; a call that reads none runs at once. Metadata that a
reply does not change (shape, dtype, device, ``.grad``) never waits. Once everything has arrived the mode leaves
the stack at the next safe point (:meth:`PendingParameters.disarm`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["PendingParameters"]

#: Reads that a reply cannot change: they never wait.
_METADATA: frozenset[Any] = frozenset(
    [
        *(
            getattr(torch.Tensor, name).__get__
            for name in ("shape", "dtype", "device", "requires_grad", "grad", "is_leaf", "ndim")
        ),
        torch.Tensor.grad.__set__,  # type: ignore[union-attr]
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.element_size,
    ]
)


class PendingParameters(TorchFunctionMode):
    """While armed: any torch function reading a pending parameter first waits for it.

    Args:
        params: the worker's optimized parameters, by index.
        wait: ``wait(index)`` returns once parameter ``index`` holds its new values (and every parameter that
            arrived meanwhile is reported through :meth:`arrived`).
    """

    def __init__(self, params: Sequence[torch.Tensor], wait: Callable[[int], None]) -> None:
        super().__init__()
        self.params = params
        self.wait = wait
        self.pending: dict[int, int] = {}  # id(parameter) -> its index
        self.armed = False
        self.bypass = False

    def arm(self, indices: Iterable[int]) -> None:
        """Mark ``indices`` pending and start intercepting (this thread's torch functions)."""
        self.pending = {id(self.params[i]): i for i in indices}
        if self.pending and not self.armed:
            self.__enter__()  # type: ignore[no-untyped-call]
            self.armed = True

    def arrived(self, index: int) -> None:
        """Parameter ``index`` holds its new values."""
        self.pending.pop(id(self.params[index]), None)

    def disarm(self) -> bool:
        """Stop intercepting if nothing is pending and this mode is innermost; whether it is off the stack.

        A mode pushed later by user code (and still active) keeps this one on the stack: it then lets every call
        through at once, and leaves at a later safe point.
        """
        if not self.armed:
            return True
        current = torch.overrides._get_current_function_mode()  # type: ignore[no-untyped-call]
        if self.pending or current is not self:
            return False
        self.__exit__(None, None, None)
        self.armed = False
        return True

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """Wait for the pending parameters ``func`` reads; then call it."""
        kwargs = kwargs or {}
        if self.pending and not self.bypass and func not in _METADATA:
            for tensor in _tensors(args, kwargs):
                index = self.pending.get(id(tensor))
                if index is None and tensor._base is not None:
                    index = self.pending.get(id(tensor._base))
                if index is not None:
                    self.wait(index)
        return func(*args, **kwargs)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[torch.Tensor]:
    """The tensors among ``args`` and ``kwargs``, one level into lists and tuples (foreach ops take lists)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item
