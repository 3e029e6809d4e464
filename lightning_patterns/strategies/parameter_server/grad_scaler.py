"""A ``torch.amp.GradScaler`` driven from outside: unscale, and update the scale from a decision made elsewhere.

With ``update_on="server"`` the step happens on the servers, so the worker cannot call ``scaler.step``: the
servers check the *averaged* gradient for inf/NaN (as the scaler does under DDP, after the all-reduce) and skip
the step on every server together; the worker then updates its scaler with that decision. Both functions here do
exactly what ``GradScaler.unscale_`` and ``GradScaler.update`` do, through the scaler's public methods only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["gradients_finite", "unscale_gradients", "update_grad_scaler"]


def unscale_gradients(params: Iterable[torch.Tensor], scale: float) -> None:
    """Multiply every gradient by ``1 / scale`` in the gradients' dtype, as ``GradScaler.unscale_`` does."""
    inverse = float(torch.tensor(scale, dtype=torch.float64).reciprocal().float())
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.grad.mul_(inverse)


def gradients_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every gradient is free of inf and NaN."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def update_grad_scaler(scaler: torch.amp.GradScaler, found_inf: bool) -> None:
    """``scaler.update()`` as if the optimizer's step had found (or not) inf/NaN in its unscaled gradients.

    The rule of ``torch._amp_update_scale_``: on inf/NaN, multiply the scale by the backoff factor and reset the
    growth tracker; else count one more good step, and after ``growth_interval`` of them multiply the scale by the
    growth factor (if that stays finite).
    """
    state = scaler.state_dict()
    if not state:  # a disabled scaler
        return
    scale = torch.tensor(state["scale"], dtype=torch.float32)
    tracker = int(state["_growth_tracker"])
    if found_inf:
        scale = scale * state["backoff_factor"]
        tracker = 0
    else:
        tracker += 1
        if tracker == state["growth_interval"]:
            grown = scale * state["growth_factor"]
            if bool(torch.isfinite(grown)):
                scale = grown
            tracker = 0
    scaler.load_state_dict({**state, "scale": float(scale), "_growth_tracker": tracker})
