"""One exception hierarchy for everything ckptio raises.

Every error a user can trigger derives from :class:`CheckpointError`, which is an ``Exception``.
torch's ``CheckpointException`` derives from ``BaseException`` (so ``except Exception`` misses it);
:func:`translate` turns it, and the per-rank failures it carries, back into these classes.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(Exception):
    """Base class of every ckptio error."""


class InvalidURLError(CheckpointError, ValueError):
    """A URL could not be parsed (empty, bad scheme, relative ``file://``...)."""


class OptionError(CheckpointError, TypeError):
    """An option that nobody declared (a misspelt keyword); the message names the closest valid one."""


class PluginError(CheckpointError):
    """A plugin is missing, broken or misbehaving."""


class BackendNotFoundError(PluginError):
    """No installed backend serves a URL scheme; the message names the package to install."""


class FormatNotFoundError(PluginError):
    """No installed format has the requested name; the message names the package to install."""


class AddonNotFoundError(PluginError):
    """No installed addon has the requested name."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint, step or file does not exist."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """Data exists but was never committed (a save was interrupted)."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes are damaged: bad checksum, truncated file, malformed header or metadata."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint asks for something ckptio refuses to do, such as unpickling or path traversal."""


class StateMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the state it is loaded into (keys, shapes or dtypes)."""

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)


class StorageError(CheckpointError, OSError):
    """The storage failed: I/O error, server unreachable, retries exhausted."""


class StorageAuthError(StorageError, PermissionError):
    """The storage refused the credentials (HTTP 401/403, bad key)."""


class ConcurrentWriteError(CheckpointError):
    """Another writer committed, replaced or deleted the same checkpoint while this one worked.

    The checkpoint at the URL is whole (the other writer's); this save did not publish anything.
    """


class RunLockedError(CheckpointError):
    """Another live process holds the run lock of a series root (see ``docs/commit-protocol.md``).

    ``holder`` has the lock file's fields (host, pid, heartbeat...). Pass ``takeover=True`` to
    :class:`~ckptio.CheckpointManager` to take the run over once you know the other job is gone.
    """

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class AsyncSaveError(CheckpointError):
    """A background save failed; raised on the next ``save``, ``wait`` or ``close``."""


def _limit(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def translate(exc: BaseException, action: str = "checkpoint operation") -> CheckpointError:
    """Map any exception raised under DCP to a :class:`CheckpointError`.

    DCP gathers failures from all ranks into a ``CheckpointException(BaseException)``; we keep the
    first ckptio error found (with its rank), so that every rank raises the same kind of error.
    """
    if isinstance(exc, CheckpointError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items(), key=lambda kv: kv[0])[0]
        inner_exc = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner_exc, BaseException):
            mapped = translate(inner_exc, action)
            if len(failures) > 1 or rank != 0:
                try:
                    mapped.args = (f"{mapped.args[0] if mapped.args else mapped} (rank {rank})",)
                except Exception:  # pragma: no cover - exotic args
                    pass
            return mapped
        # DCP wraps remote failures as (exception, traceback summary)
        return CheckpointError(f"{action} failed on rank {rank}: {inner}")
    if isinstance(exc, PermissionError):
        err: CheckpointError = StorageAuthError(f"{action}: permission denied: {exc}")
    elif isinstance(exc, FileNotFoundError):
        err = CheckpointNotFoundError(f"{action}: {exc}")
    elif isinstance(exc, OSError):
        err = StorageError(f"{action}: storage error: {exc}")
    else:
        err = CheckpointError(f"{action} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
