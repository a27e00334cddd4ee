"""fsspec backend for ckptio: ``s3://``, ``gs://``, ``az://``, ``memory://`` and any other fsspec protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio._lazy import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from ckptio.retry import RetryPolicy

    from .backend import FsspecBackend

_EXPORTS = {
    "FsspecBackend": ".backend",
    "RetryPolicy": "ckptio.retry",
}
__all__ = ["FsspecBackend", "RetryPolicy"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
