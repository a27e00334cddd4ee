"""Which storage errors are worth retrying, and the retry loop itself (shared by cloud backends).

fsspec drivers surface the same failure in many shapes: botocore ``ClientError`` (raw, or turned
into ``OSError``/``PermissionError`` by s3fs with the original as ``__cause__``), aiohttp
connection errors, gcsfs ``HttpError``, azure-core ``HttpResponseError``. :func:`classify` walks
the exception chain and sorts each failure into one of four kinds by *duck typing* (status codes,
error codes, class names), so no driver has to be importable for this module to work:

* ``auth``: refused credentials (401/403). Never retried; raised as ``StorageAuthError``.
* ``missing``: no such bucket/object (404). Never retried; raised as ``CheckpointNotFoundError``.
* ``transient``: 5xx, 408, 429, throttling (``SlowDown``), connection resets, timeouts. Retried with
  capped exponential backoff and full jitter.
* ``permanent``: anything else (bad request, ...). Raised as ``StorageError`` at once.

Messages name the URL and the error code, and are scrubbed of every secret the backend was given.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

from .errors import CheckpointError, CheckpointNotFoundError, StorageAuthError, StorageError

T = TypeVar("T")
Kind = Literal["auth", "missing", "transient", "permanent"]

AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthenticationFailed",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "InvalidAuthenticationInfo",
        "NoAuthenticationInformation",
        "Unauthorized",
        "Forbidden",
    }
)
MISSING_CODES = frozenset(
    {"NoSuchBucket", "NoSuchKey", "ContainerNotFound", "BlobNotFound", "ResourceNotFound", "404"}
)
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "ServerBusy",
        "OperationTimedOut",
        "503",
        "500",
    }
)
TRANSIENT_NAME_HINTS = (
    "Timeout",
    "Connection",
    "Disconnected",
    "Payload",
    "IncompleteRead",
    "ResponseStreaming",
    "ServiceRequest",
    "ServiceResponse",
    "ProtocolError",
    "ReadError",
    "Retryable",
)
TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT, errno.EAGAIN}
)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and service error code, for botocore, azure-core and gcsfs errors."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (int(status) if status else None), (str(code) if code else None)
    status = getattr(exc, "status_code", None)  # azure-core HttpResponseError
    if status is None:
        status = getattr(exc, "code", None)  # gcsfs HttpError
    if status is None:
        status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    code = getattr(exc, "error_code", None)
    try:
        status_int = int(status) if status is not None else None
    except (TypeError, ValueError):
        status_int = None
    return status_int, (str(code) if code else None)


def conditional_outcome(exc: BaseException) -> str | None:
    """How a conditional write (``If-None-Match: *``) was refused, anywhere in ``exc``'s chain:
    ``"exists"`` for 412 PreconditionFailed (the object is there), ``"conflict"`` for 409
    ConditionalRequestConflict (another conditional write of the key is in flight), else ``None``.
    """
    for e in _chain(exc):
        status, code = _status_and_code(e)
        if code == "PreconditionFailed" or status == 412:
            return "exists"
        if code == "ConditionalRequestConflict" or status == 409:
            return "conflict"
    return None


def after_conditional_failure(exc: BaseException, attempt: int, policy: RetryPolicy) -> str:
    """What a conditional create does after ``exc`` on try ``attempt`` (0-based), one rule for
    every backend: ``"exists"`` (look whose object is there: a put whose answer was lost may be
    ours), ``"lost"`` (another create still holds the key after the last try), ``"retry"``
    (after ``policy.delay(attempt)``), or ``"raise"`` (a permanent error, or tries exhausted).
    """
    outcome = conditional_outcome(exc)
    if outcome == "exists":
        return "exists"
    last = attempt + 1 >= policy.attempts
    if outcome == "conflict":  # another conditional put of this key is in flight
        return "lost" if last else "retry"
    return "raise" if classify(exc) != "transient" or last else "retry"


def _classify_one(exc: BaseException) -> Kind | None:
    status, code = _status_and_code(exc)
    if code in AUTH_CODES or status in (401, 403):
        return "auth"
    if code in MISSING_CODES or status == 404:
        return "missing"
    if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
        return "transient"
    if status is not None or code is not None:
        return "permanent"
    if isinstance(exc, PermissionError):
        return "auth"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return "transient"
    name = type(exc).__name__
    if any(h in name for h in TRANSIENT_NAME_HINTS):
        return "transient"
    return None


def classify(exc: BaseException) -> Kind:
    """Sort a failure into ``auth``, ``missing``, ``transient`` or ``permanent`` (see the module doc)."""
    for e in _chain(exc):
        kind = _classify_one(e)
        if kind is not None:
            return kind
    return "permanent"


def describe(exc: BaseException) -> str:
    """A short description: the innermost service error code/status, else the exception's text."""
    for e in _chain(exc):
        status, code = _status_and_code(e)
        if status is not None or code is not None:
            parts = [p for p in (code, f"HTTP {status}" if status else None) if p]
            return " / ".join(parts)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried.

    :ivar attempts: tries per operation, the first included (``1`` disables retries).
    :ivar base_delay: seconds before the first retry; doubles each time.
    :ivar max_delay: cap of one wait; each wait is drawn uniformly below the capped value (full
        jitter, so that many ranks hitting the same throttled bucket spread out).
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2**attempt)))


class ErrorMapper:
    """Turns driver exceptions into ckptio errors naming ``url`` and never a secret."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted(
            {s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True
        )

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def to_ckptio(self, exc: BaseException, action: str, url: str, attempts: int = 1) -> CheckpointError:
        if isinstance(exc, CheckpointError):
            return exc
        kind = classify(exc)
        detail = self.scrub(describe(exc))
        err: CheckpointError
        if kind == "auth":
            err = StorageAuthError(
                f"{action} {url}: the storage refused the credentials ({detail}); check the access key, secret "
                "or token configured for this bucket (storage_options, environment or the driver's config)"
            )
        elif kind == "missing":
            err = CheckpointNotFoundError(f"{action} {url}: not found ({detail})")
        elif kind == "transient":
            err = StorageError(
                f"{action} {url} failed after {attempts} attempt(s): {detail}; the storage is unreachable or "
                "overloaded (raise `attempts` in storage_options to retry longer)"
            )
        else:
            err = StorageError(f"{action} {url} failed: {detail}")
        return err


def retry_call(fn: Callable[[], T], policy: RetryPolicy, mapper: ErrorMapper, action: str, url: str) -> T:
    """Run ``fn`` with retries on transient failures; raise a ckptio error otherwise."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as exc:
            if classify(exc) != "transient" or attempt + 1 >= policy.attempts:
                raise mapper.to_ckptio(exc, action, url, attempt + 1) from exc
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


async def aretry_call(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, mapper: ErrorMapper, action: str, url: str
) -> T:
    """The coroutine version of :func:`retry_call`."""
    for attempt in range(policy.attempts):
        try:
            return await fn()
        except CheckpointError:
            raise
        except Exception as exc:
            if classify(exc) != "transient" or attempt + 1 >= policy.attempts:
                raise mapper.to_ckptio(exc, action, url, attempt + 1) from exc
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
