"""fsspec backend for ckptio: ``s3://``, ``gs://``, ``az://``, ``memory://`` and any other fsspec protocol."""

from ckptio.retry import RetryPolicy

from .backend import FsspecBackend

__all__ = ["FsspecBackend", "RetryPolicy"]
