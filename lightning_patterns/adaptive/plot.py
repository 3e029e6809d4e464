"""``gns.png``: batch size, gradient noise scale and learning rate over the optimizer steps (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_history"]


def plot_history(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """Write a PNG with three panels sharing the step axis: global batch size, noise scale, learning rate.

    Args:
        history: rows with ``step``, ``batch_size``, ``noise_scale`` and ``lr`` (as
            :attr:`~lightning_patterns.callbacks.GradientNoiseScale.history` holds them).
        path: the PNG to write; its folder is created.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plotting the noise scale needs matplotlib; install it with `pip install 'lightning-patterns[plot]'`."
        ) from None
    steps = [row["step"] for row in history]
    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    panels = (
        ("batch_size", "global batch size", "tab:blue"),
        ("noise_scale", "gradient noise scale", "tab:orange"),
        ("lr", "learning rate", "tab:green"),
    )
    for ax, (key, label, color) in zip(axes, panels, strict=True):
        values = [row[key] if math.isfinite(row[key]) else math.nan for row in history]
        ax.plot(steps, values, color=color, drawstyle="steps-post" if key == "batch_size" else "default")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("Adaptive batch size: batch, noise scale and learning rate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
