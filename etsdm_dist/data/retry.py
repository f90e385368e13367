"""Storage errors: which are worth retrying, how long to wait, and what to tell the user.

A step of its own because the verdict is pure: it looks only at an exception (and its
`__cause__` chain, where s3fs keeps the botocore original), never at a filesystem. storage.py
owns the retry loops (they also drop cached connections); this module decides whether to loop.
The ShardReadError family lives here because the verdict needs it (our own read errors are
permanent by definition); storage.py re-exports it, so callers keep catching storage.ShardReadError.

Transient: connection reset, timeout, 5xx, SlowDown and the other throttling codes.
Permanent: missing object, truncated object, bad credentials, anything we raised ourselves.
"""
from __future__ import annotations

import errno
import random
import socket
import time

CRED_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_DEFAULT_REGION, "
    "and AWS_ENDPOINT_URL for a non-AWS S3 server"
)


class ShardReadError(OSError):
    """A read that will not succeed by retrying; names the URL (and byte range)."""

    def __init__(self, url: str, message: str, *, start: int | None = None,
                 end: int | None = None, reason: str = "error"):
        rng = f" bytes [{start}, {end})" if start is not None else ""
        super().__init__(f"{url}{rng}: {message}")
        self.url, self.start, self.end, self.reason = url, start, end, reason


class ShardNotFoundError(ShardReadError, FileNotFoundError):
    """The object does not exist (catchable as FileNotFoundError too)."""


class StorageAccessError(OSError):
    """Destination cannot be used (no credentials, no bucket, not writable); says what to do."""


# --------------------------------------------------------------------------- classification

_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
    errno.EBUSY,  # s3fs maps 503 SlowDown / ServiceUnavailable here
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs maps 500 InternalError here
}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "503", "500", "502", "504",
}
_TRANSIENT_TYPE_NAMES = {
    # botocore (all HTTPClientError subclasses, plus streaming failures)
    "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError",
    # aiohttp
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ServerTimeoutError", "ClientOSError",
    # http.client / fsspec
    "IncompleteRead", "RemoteDisconnected", "FSTimeoutError",
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              ShardReadError, StorageAccessError)


def _http_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        st = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(st) if st else None
    st = getattr(exc, "status", None)  # aiohttp ClientResponseError
    if isinstance(st, int) and 100 <= st < 600:
        return st
    return None


def _one_transient(exc: BaseException) -> bool | None:
    """True / False when this exception alone decides; None when it says nothing."""
    if isinstance(exc, _PERMANENT):
        return False
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _TRANSIENT_TYPE_NAMES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in _TRANSIENT_CODES:
        return True  # throttling codes come with 400 on some servers
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS
    text = str(exc)
    if "SlowDown" in text or "reduce your request rate" in text or "Service Unavailable" in text:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed (pure: looks only at the exception).

    Follows explicit causes (`raise X from Y`), because s3fs turns botocore errors into OSError
    and keeps the original as __cause__; the outermost definite verdict wins.
    """
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        verdict = _one_transient(e)
        if verdict is not None:
            return verdict
        e, seen = e.__cause__, seen + 1
    return False


def explain_error(url: str, exc: BaseException) -> str:
    """A one-line, actionable description of why `url` could not be used."""
    names = set()
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            break
        names |= {c.__name__ for c in type(e).__mro__}
        e = e.__cause__ or e.__context__
    text = str(exc)
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return f"{url}: no credentials found; {CRED_HINT}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"{url}: the bucket does not exist; create it first (or check AWS_ENDPOINT_URL)"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text:
        return f"{url}: access denied ({text}); check the credentials: {CRED_HINT}"
    if is_transient(exc):
        return f"{url}: storage unreachable ({type(exc).__name__}: {text}); check AWS_ENDPOINT_URL"
    return f"{url}: {type(exc).__name__}: {text}"


def is_invalid_range(exc: BaseException) -> bool:
    """Whether the server said the range starts past the end of the object (HTTP 416)."""
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            return False
        if _http_status(e) == 416 or "InvalidRange" in str(e) or "Range Not Satisfiable" in str(e):
            return True
        e = e.__cause__
    return False


def sleep_backoff(attempt: int, backoff_s: float) -> None:
    # Exponential with jitter so many ranks hitting one throttled bucket do not retry in lockstep.
    time.sleep(min(backoff_s * (2 ** attempt), 30.0) * random.uniform(0.5, 1.5))
