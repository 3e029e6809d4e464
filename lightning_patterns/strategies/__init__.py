"""Lightning strategies: ``ParameterServerStrategy``, for the Lightning package in use.

``Trainer(strategy="parameter_server")`` works once ``lightning_patterns`` is imported (either Lightning package).
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = ["ParameterServerStrategy"]

__getattr__ = lazy_exports(__name__, {"ParameterServerStrategy": "lightning:ParameterServerStrategy"})
