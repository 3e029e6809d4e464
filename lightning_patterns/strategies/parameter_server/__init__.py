"""The parameter-server pattern: byte-balanced chunks over servers that average gradients or run the optimizer."""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "Chunk",
    "ELEMENTWISE_OPTIMIZERS",
    "ParameterServerStrategy",
    "ParameterServerTelemetry",
    "partition_parameters",
    "server_loads",
]

_PARTITION = "lightning_patterns.strategies.parameter_server.partition"
__getattr__ = lazy_exports(
    __name__,
    {
        "Chunk": f"{_PARTITION}:Chunk",
        "ELEMENTWISE_OPTIMIZERS": "lightning_patterns.strategies.parameter_server.optimizers:ELEMENTWISE_OPTIMIZERS",
        "ParameterServerStrategy": "lightning:ParameterServerStrategy",
        "ParameterServerTelemetry": "lightning_patterns.strategies.parameter_server.telemetry:ParameterServerTelemetry",
        "partition_parameters": f"{_PARTITION}:partition_parameters",
        "server_loads": f"{_PARTITION}:server_loads",
    },
)
