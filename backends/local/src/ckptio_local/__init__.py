"""Local file-system backend for ckptio: plain paths and ``file://`` URLs."""

from .backend import LocalBackend

__all__ = ["LocalBackend"]
