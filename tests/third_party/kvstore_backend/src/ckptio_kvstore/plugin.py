"""Entry point: registers the ``kv`` scheme (lazily, by dotted path)."""

from __future__ import annotations

from typing import Any

from ckptio import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    register("kv", "ckptio_kvstore.backend:KVBackend")
