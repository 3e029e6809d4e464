"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode, not a mock of fsspec.

Needs the ``moto[server]`` and ``s3fs`` extras (``pip install lightning-patterns[test]``).

Examples:
    >>> from lightning_patterns.testing import moto_s3_server
    >>> with moto_s3_server() as server:  # doctest: +SKIP
    ...     root = server.create_bucket("data")
    ...     write_dataset(samples, f"{root}/mnist", storage_options=server.storage_options)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MotoS3Server", "moto_s3_server"]

log = logging.getLogger(__name__)

# Dummy credentials: moto accepts any; real ones must never reach a test server.
_DUMMY_KEY = "lightning-patterns-test-key"
_DUMMY_SECRET = "lightning-patterns-test-secret"


@dataclass(frozen=True)
class MotoS3Server:
    """A running moto S3 server.

    Args:
        endpoint_url: ``http://127.0.0.1:<port>``.
        region: the AWS region clients use.
        storage_options: keyword arguments for ``s3fs.S3FileSystem`` (and so ``storage_options`` of any
            fsspec call) that reach this server. Hidden from ``repr`` so credentials never end up in logs.
    """

    endpoint_url: str
    region: str
    storage_options: dict[str, Any] = field(repr=False)

    def filesystem(self) -> Any:
        """A fresh ``s3fs.S3FileSystem`` for this server (not shared through fsspec's instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its URL, ``s3://<name>``."""
        import s3fs

        options = dict(self.storage_options)
        if self.region == "us-east-1":
            # s3fs sends the client's region as LocationConstraint, which S3 refuses for us-east-1.
            options["client_kwargs"] = {k: v for k, v in options["client_kwargs"].items() if k != "region_name"}
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(name)
        return f"s3://{name}"


def _moto_server_cls() -> Any:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        raise ImportError(
            f"moto_s3_server needs moto's server mode: `pip install 'moto[server]' s3fs` ({err})."
        ) from err
    return ThreadedMotoServer


@contextmanager
def moto_s3_server(*, region: str = "us-east-1", stop_timeout: float = 10.0) -> Iterator[MotoS3Server]:
    """Start moto's S3 server on 127.0.0.1 with a free port, yield it, and stop it on exit.

    Args:
        region: the region configured for clients.
        stop_timeout: seconds to wait for the server thread to stop; after that it is left to die with the
            process (it is a daemon thread), so a stuck request cannot hang the test session.
    """
    server = _moto_server_cls()(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options: dict[str, Any] = {
            "key": _DUMMY_KEY,
            "secret": _DUMMY_SECRET,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": region},
        }
        log.debug("Started moto S3 server at %s", endpoint)
        yield MotoS3Server(endpoint_url=endpoint, region=region, storage_options=options)
    finally:
        stopper = threading.Thread(target=server.stop, name="moto-s3-server-stop", daemon=True)
        stopper.start()
        stopper.join(stop_timeout)
        if stopper.is_alive():
            log.warning("moto S3 server did not stop within %.1f s; leaving its daemon thread", stop_timeout)
