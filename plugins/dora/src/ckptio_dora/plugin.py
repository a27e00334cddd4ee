"""Entry point of ``ckptio-dora``: the ``dora`` addon."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_addons(register: Any) -> None:
    register("dora", "ckptio_dora.addon:DoraAddon")
