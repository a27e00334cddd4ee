"""fsspec backend for ckptio: ``s3://``, ``gs://``, ``az://``, ``memory://`` and any other fsspec protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from ckptio.ext import RetryPolicy

    from .backend import FsspecBackend, MemoryBackend, S3Backend

_EXPORTS = {
    "FsspecBackend": ".backend",
    "S3Backend": ".backend",
    "MemoryBackend": ".backend",
    "RetryPolicy": "ckptio.ext",
}
__all__ = ["FsspecBackend", "MemoryBackend", "RetryPolicy", "S3Backend"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
