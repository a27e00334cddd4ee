"""multi-storage-client backend for ckptio: ``msc://profile/path`` URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

__all__ = ["MscBackend", "MscPosixBackend", "MscS3Backend", "open_msc_backend"]
# every public name lives in .backend, imported on first use (see ckptio._lazy)
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, ".backend"))

if TYPE_CHECKING:
    from .backend import MscBackend, MscPosixBackend, MscS3Backend, open_msc_backend
