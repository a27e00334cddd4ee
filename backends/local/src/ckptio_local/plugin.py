"""Entry point of ``ckptio-local``: serves ``file://`` and plain paths."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    register("file", "ckptio_local.backend:LocalBackend")
    register("local", "ckptio_local.backend:LocalBackend")
