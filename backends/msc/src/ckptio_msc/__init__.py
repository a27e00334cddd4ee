"""multi-storage-client backend for ckptio: ``msc://profile/path`` URLs."""

from .backend import MscBackend, MscPosixBackend, open_msc_backend

__all__ = ["MscBackend", "MscPosixBackend", "open_msc_backend"]
