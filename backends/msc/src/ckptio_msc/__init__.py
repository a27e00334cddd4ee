"""multi-storage-client backend for ckptio: ``msc://profile/path`` URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from .backend import MscBackend, MscPosixBackend, MscS3Backend, open_msc_backend

_EXPORTS = {
    "MscBackend": ".backend",
    "MscPosixBackend": ".backend",
    "MscS3Backend": ".backend",
    "open_msc_backend": ".backend",
}
__all__ = ["MscBackend", "MscPosixBackend", "MscS3Backend", "open_msc_backend"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
