"""Entry point of ``ckptio-fsspec``.

The object stores it is built for are registered at priority 0. Every other protocol fsspec knows
is registered at a negative priority, so that a dedicated backend (``ckptio-msc`` for ``msc://``,
``ckptio-local`` for files) always wins. ``file``/``local`` are never taken: local checkpoints need
the POSIX backend's atomic renames and fsyncs.
"""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl

FACTORY = "ckptio_fsspec.backend:FsspecBackend"
#: schemes whose class declares an atomic ``create_bytes``
SPECIAL = {
    "s3": "ckptio_fsspec.backend:S3Backend",
    "s3a": "ckptio_fsspec.backend:S3Backend",
    "memory": "ckptio_fsspec.backend:MemoryBackend",
}
PRIMARY = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
NEVER = frozenset({"file", "local"})
CATCH_ALL_PRIORITY = -10


@hookimpl
def register_backends(register: Any) -> None:
    import fsspec

    for scheme in PRIMARY:
        register(scheme, SPECIAL.get(scheme, FACTORY), 0)
    for scheme in fsspec.available_protocols():
        if scheme not in NEVER and scheme not in PRIMARY:
            register(scheme, FACTORY, CATCH_ALL_PRIORITY)
