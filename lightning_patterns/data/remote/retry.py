"""When to retry a remote read, and what to say when giving up.

:class:`RetryPolicy` bounds the attempts and the backoff between them. :func:`is_transient_error` sorts the
exceptions a read can raise into those worth asking again about (resets, timeouts, truncated bodies, HTTP
5xx and 429) and those that are not (missing objects, permissions, other HTTP 4xx, programming errors). A
refused connection sits in between: the host answered that nothing listens at that port, which a server
that is restarting may fix in a moment but retrying for long will not, so it gets :data:`REFUSED_ATTEMPTS`
attempts at most and then fails saying the server is not reachable.

Messages never show request headers or query strings, which may carry credentials
(:func:`describe_error`, :func:`redact_url`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
import urllib.parse

from lightning_patterns.exceptions import ChecksumMismatchError, DeadlineExceededError, RemoteUnreachableError

__all__ = [
    "REFUSED_ATTEMPTS",
    "RetryPolicy",
    "describe_error",
    "give_up_error",
    "is_transient_error",
    "redact_url",
    "refused_address",
]

# A refused connection is retried once (a server restarting), not max_attempts times.
REFUSED_ATTEMPTS = 2
# OSErrors that describe the request, not the network: asking again cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient remote faults.

    The delay before retry ``k`` (1-based) is ``min(max_backoff, initial_backoff * 2 ** (k - 1))``, reduced by a
    random fraction of at most ``jitter`` so that many workers do not retry in lockstep. A failure after which
    new bytes arrived resets the count, so a long transfer over a flaky link still finishes, while a remote
    that never makes progress fails after ``max_attempts`` attempts (a refused connection after
    :data:`REFUSED_ATTEMPTS`).

    Args:
        max_attempts: Attempts per request without progress, the first included; ``1`` disables retries.
        initial_backoff: Seconds to wait before the first retry.
        max_backoff: Upper bound on the wait between two attempts, in seconds.
        jitter: Fraction in ``[0, 1]`` of each wait that is randomized; ``0`` waits exactly the backoff.
        timeout: Seconds without progress after which a request counts as failed (connect or read inactivity
            over HTTP, a whole range request on other asynchronous backends); ``None`` waits forever.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: float = 0.5
    timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy(max_attempts={self.max_attempts!r}) must be an integer >= 1; "
                "use max_attempts=1 to disable retries."
            )
        if not self.initial_backoff >= 0:
            raise ValueError(f"RetryPolicy(initial_backoff={self.initial_backoff!r}) must be >= 0 seconds.")
        if not self.max_backoff >= self.initial_backoff:
            raise ValueError(
                f"RetryPolicy(max_backoff={self.max_backoff!r}) must be >= initial_backoff={self.initial_backoff!r}; "
                "raise max_backoff or lower initial_backoff."
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"RetryPolicy(jitter={self.jitter!r}) must be in [0, 1], e.g. jitter=0.5.")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(
                f"RetryPolicy(timeout={self.timeout!r}) must be > 0 seconds, or None to wait without a limit."
            )

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based).

        Args:
            retry: Which retry this is; the first retry is ``1``.
            rng: Source of jitter; the module-level ``random`` when ``None``.

        Returns:
            The delay, in ``[(1 - jitter) * base, base]`` with ``base`` the capped exponential backoff.
        """
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** max(retry - 1, 0))
        draw = (rng or random).random()
        return base * (1.0 - self.jitter * draw)

    def attempts_for(self, exc: BaseException) -> int:
        """How many fruitless attempts in a row a fault like ``exc`` is worth, the first included.

        Args:
            exc: The exception a remote read raised.

        Returns:
            ``1`` for a permanent error, at most :data:`REFUSED_ATTEMPTS` for a refused connection,
            ``max_attempts`` for any other transient fault.
        """
        if refused_address(exc) is not None:
            return min(self.max_attempts, REFUSED_ATTEMPTS)
        return self.max_attempts if is_transient_error(exc) else 1


def is_transient_error(exc: BaseException) -> bool:
    """Whether asking the remote again may succeed where ``exc`` failed.

    Transient: connection errors and resets (a refused connection included, though it is retried only
    :data:`REFUSED_ATTEMPTS` times), timeouts, truncated or malformed bodies, HTTP 5xx and 429, and any other
    ``OSError``. Not transient: missing objects (``FileNotFoundError``, HTTP 404), permission errors, other
    HTTP 4xx, a read's own deadline passing, and programming errors.

    Args:
        exc: The exception a remote read raised.

    Returns:
        ``True`` if the read should be retried.
    """
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (*_PERMANENT_OS_ERRORS, ChecksumMismatchError, DeadlineExceededError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, asyncio.TimeoutError | EOFError):
        return True
    if refused_address(exc) is not None:  # e.g. botocore's EndpointConnectionError, which is no OSError
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is the optional `http` extra
        return False
    return isinstance(exc, aiohttp.ClientError)


def refused_address(exc: BaseException, url: str | None = None) -> str | None:
    """``"host:port"`` if ``exc`` (or an exception it was raised from) is a refused connection, else ``None``.

    Args:
        exc: The exception a remote read raised.
        url: The URL being read; its host and port are named when the exception does not tell them.

    Returns:
        Where the connection was refused, or ``None`` for any other error.
    """
    chain = _chain(exc)
    if not any(_is_refusal(e) for e in chain):
        return None
    for e in chain:
        host, port = getattr(e, "host", None), getattr(e, "port", None)  # aiohttp's ClientConnectorError
        if isinstance(host, str) and isinstance(port, int):
            return f"{host}:{port}"
        endpoint = _botocore_kwargs(e).get("endpoint_url")  # botocore's EndpointConnectionError
        if isinstance(endpoint, str) and _host_port(endpoint):
            return _host_port(endpoint)
    return (_host_port(url) if url else None) or "the remote"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 16:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        # aiohttp keeps the socket error as `os_error`, botocore as the `error` keyword of its exceptions.
        for inner in (e.__cause__, e.__context__, getattr(e, "os_error", None), _botocore_kwargs(e).get("error")):
            if isinstance(inner, BaseException):
                todo.append(inner)
    return seen


def _botocore_kwargs(exc: BaseException) -> dict[str, object]:
    kwargs = getattr(exc, "kwargs", None)
    return kwargs if isinstance(kwargs, dict) else {}


def _is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError) or (isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED)


def _host_port(url: str) -> str | None:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.hostname}:{port}" if port else parts.hostname


def _http_status(exc: BaseException) -> int | None:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status
    return None


def describe_error(exc: BaseException) -> str:
    """A one-line description of ``exc`` that leaves out request headers (they may carry credentials).

    Args:
        exc: Any exception.

    Returns:
        ``"HTTP 503 Service Unavailable"`` for HTTP errors, else ``"<type>: <first line of the message>"``.
    """
    status = _http_status(exc)
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'message', '')}".rstrip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact_url(url: str) -> str:
    """The URL without user info or query string, which may carry credentials or signatures.

    Args:
        url: Any URL or path.

    Returns:
        ``url`` with ``user:password@`` removed and the query replaced by ``<redacted>``.

    Example:
        >>> redact_url("https://user:secret@host/data?sig=abc")
        'https://host/data?<redacted>'
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def give_up_error(url: str, exc: BaseException, failures: int, policy: RetryPolicy, *, offset: int | None) -> OSError:
    """The error raised once ``failures`` fruitless attempts to read ``url`` have used up the retries.

    Args:
        url: The URL being read.
        exc: The last attempt's exception.
        failures: Fruitless attempts in a row.
        policy: The policy that allowed them.
        offset: The byte the read had reached, if it reads bytes.

    Returns:
        A :class:`~lightning_patterns.exceptions.RemoteUnreachableError` for a refused connection (retrying
        more would not help), else an ``OSError`` that suggests allowing more attempts.
    """
    where = "" if offset is None else f" at byte {offset}"
    address = refused_address(exc, url)
    if address is not None:
        return RemoteUnreachableError(
            f"The server is not reachable at {address}: the connection was refused ({failures} attempt"
            f"{'s' if failures != 1 else ''}) while reading {redact_url(url)}{where}, so nothing is listening "
            "there. Check the host and port in the URL (or the `endpoint_url` in `storage_options`) and that the "
            "server is running; retrying more would not help while it is down."
        )
    return OSError(
        f"Reading {redact_url(url)}{where} failed {failures} times in a row; last error: {describe_error(exc)}. "
        "Check that the remote is reachable, or allow more attempts with "
        f"RetryPolicy(max_attempts={policy.max_attempts * 2})."
    )
