"""Entry point of ``ckptio-msc``: serves ``msc://`` (priority 0, above fsspec's catch-all)."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    register("msc", "ckptio_msc.backend:open_msc_backend", 0)
