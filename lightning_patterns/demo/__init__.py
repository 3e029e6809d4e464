"""The embedded default of the main job: a generated Fashion-MNIST-shaped dataset, served from 127.0.0.1.

With nothing but the repository, ``make demo`` writes the dataset to shards, serves them over HTTP from
a server process it starts on 127.0.0.1 (so the remote path is really exercised), streams them into
training, and stops the server when ``fit`` ends, fails or is interrupted.
"""

from __future__ import annotations

from lightning_patterns.demo.embedded import EmbeddedFashionMNIST, prepare_embedded_dataset
from lightning_patterns.demo.server import LocalHTTPServer

__all__ = ["EmbeddedFashionMNIST", "LocalHTTPServer", "prepare_embedded_dataset"]
