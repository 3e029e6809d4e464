"""Adaptive batch size: the gradient noise scale, goodput, and the callbacks that use them (AdaptDL / Pollux).

- :mod:`~lightning_patterns.adaptive.noise_scale`: unbiased ``|G|²`` and ``tr(Σ)`` from two gradient norms,
  smoothed; the noise scale ``B = tr(Σ) / |G|²``.
- :mod:`~lightning_patterns.adaptive.goodput`: the step-time model, statistical efficiency, goodput, its argmax
  over batch size × accumulation, AdaScale's gain.
- :mod:`~lightning_patterns.adaptive.protocols`: what a DataModule (``BatchSizeAdjustable``) and a strategy
  (``ReportsGradientNorms``) implement to take part.
- ``GradientNoiseScale`` and ``AdaptiveBatchSize``: the callbacks (also in :mod:`lightning_patterns.callbacks`).

Names are imported on first use; the pure modules need only numpy (and torch for the measurements).
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "AdaptiveBatchSize",
    "BatchConfig",
    "BatchSizeAdjustable",
    "GradientNoiseScale",
    "GradientNormSample",
    "GradientStats",
    "NoiseScaleEMA",
    "ReportsGradientNorms",
    "StepTimeModel",
    "StepTimes",
    "adascale_gain",
    "best_batch_size",
    "efficiency",
    "estimate_gradient_stats",
    "fit_step_time",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "AdaptiveBatchSize": "lightning:AdaptiveBatchSize",
        "BatchConfig": "lightning_patterns.adaptive.goodput:BatchConfig",
        "BatchSizeAdjustable": "lightning_patterns.adaptive.protocols:BatchSizeAdjustable",
        "GradientNoiseScale": "lightning:GradientNoiseScale",
        "GradientNormSample": "lightning_patterns.adaptive.noise_scale:GradientNormSample",
        "GradientStats": "lightning_patterns.adaptive.noise_scale:GradientStats",
        "NoiseScaleEMA": "lightning_patterns.adaptive.noise_scale:NoiseScaleEMA",
        "ReportsGradientNorms": "lightning_patterns.adaptive.protocols:ReportsGradientNorms",
        "StepTimeModel": "lightning_patterns.adaptive.goodput:StepTimeModel",
        "StepTimes": "lightning_patterns.adaptive.goodput:StepTimes",
        "adascale_gain": "lightning_patterns.adaptive.goodput:adascale_gain",
        "best_batch_size": "lightning_patterns.adaptive.goodput:best_batch_size",
        "efficiency": "lightning_patterns.adaptive.goodput:efficiency",
        "estimate_gradient_stats": "lightning_patterns.adaptive.noise_scale:estimate_gradient_stats",
        "fit_step_time": "lightning_patterns.adaptive.goodput:fit_step_time",
    },
)
