"""Lightning strategies; importing this module registers their short names with Lightning's registry.

After ``import lightning_patterns.strategies``, ``Trainer(strategy="parameter_server")`` works.
"""

from __future__ import annotations

from pytorch_lightning.strategies import StrategyRegistry

from lightning_patterns.strategies.parameter_server import ParameterServerStrategy

__all__ = ["ParameterServerStrategy"]

ParameterServerStrategy.register_strategies(StrategyRegistry)
