"""Entry point of ``ckptio-peft``: the ``peft`` addon."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_addons(register: Any) -> None:
    register("peft", "ckptio_peft.addon:PeftAddon")
