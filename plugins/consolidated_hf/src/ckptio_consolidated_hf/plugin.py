"""Entry point of ``ckptio-consolidated-hf``: the ``consolidated-hf`` addon."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_addons(register: Any) -> None:
    register("consolidated-hf", "ckptio_consolidated_hf.addon:ConsolidatedHFAddon")
