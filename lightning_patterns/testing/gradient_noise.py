"""A linear-regression problem whose gradient noise is known exactly, for checking noise-scale estimates.

Samples ``x ~ N(0, I_d)``, targets ``y = x · w* + σ ε`` with ``ε ~ N(0, 1)``, loss ``½ (x · w − y)²``. At the
weights ``w`` (``w*`` plus a fixed offset) the per-sample gradient is ``(x · w − y) x``; over the whole dataset
their mean is ``G`` and their covariance ``Σ``, computed exactly by :meth:`LinearRegressionNoise.exact`. In
expectation over ``x`` and ``ε``: ``G = w − w*`` and ``tr(Σ) = (d + 1) |w − w*|² + d σ²``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lightning_patterns.adaptive.noise_scale import GradientStats

__all__ = ["LinearRegressionNoise"]


@dataclass(frozen=True)
class LinearRegressionNoise:
    """The dataset, the weights to evaluate at, and the exact ``|G|²`` and ``tr(Σ)`` there.

    Attributes:
        num_samples: dataset size ``N``.
        dim: features ``d``.
        noise: target noise ``σ``.
        offset: scale of the random offset of the evaluated weights from ``w*``.
        seed: fixes everything.
    """

    num_samples: int = 4096
    dim: int = 8
    noise: float = 1.0
    offset: float = 0.5
    seed: int = 0

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.num_samples, self.dim, generator=generator, dtype=torch.float64)
        w_true = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        y = x @ w_true + self.noise * torch.randn(self.num_samples, generator=generator, dtype=torch.float64)
        weights = w_true + self.offset * torch.randn(self.dim, generator=generator, dtype=torch.float64)
        return x, y, weights

    @property
    def inputs(self) -> torch.Tensor:
        """``x``, ``(N, d)`` float32."""
        return self._tensors[0].float()

    @property
    def targets(self) -> torch.Tensor:
        """``y``, ``(N,)`` float32."""
        return self._tensors[1].float()

    @property
    def weights(self) -> torch.Tensor:
        """The weights ``w`` the gradients are taken at, ``(d,)`` float32."""
        return self._tensors[2].float()

    @cached_property
    def _per_sample(self) -> torch.Tensor:
        x, y, w = self._tensors
        return (x @ w - y)[:, None] * x

    def per_sample_gradients(self) -> torch.Tensor:
        """``(x_i · w − y_i) x_i`` for every sample, ``(N, d)`` float64."""
        return self._per_sample.clone()

    def exact(self) -> GradientStats:
        """``|G|²`` and ``tr(Σ)`` over the whole dataset (``Σ`` the population covariance of per-sample gradients)."""
        grads = self._per_sample
        mean = grads.mean(dim=0)
        trace = ((grads - mean) ** 2).sum(dim=1).mean()
        return GradientStats(grad_sqr=float(mean @ mean), grad_var=float(trace))

    def batch_gradient(self, indices: torch.Tensor) -> torch.Tensor:
        """The gradient of the mean loss over the samples ``indices``, float64."""
        return self._per_sample[indices].mean(dim=0)
