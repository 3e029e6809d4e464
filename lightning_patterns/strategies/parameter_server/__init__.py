"""The parameter-server pattern: servers hold byte-balanced chunks of the parameters and run the optimizer."""

from __future__ import annotations

from lightning_patterns.strategies.parameter_server.partition import Chunk, partition_parameters, server_loads
from lightning_patterns.strategies.parameter_server.strategy import ParameterServerStrategy
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

__all__ = ["Chunk", "ParameterServerStrategy", "ParameterServerTelemetry", "partition_parameters", "server_loads"]
