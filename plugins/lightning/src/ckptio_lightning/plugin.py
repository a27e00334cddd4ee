"""Entry point of ``ckptio-lightning``: the ``lightning`` integration.

Importing this module is cheap (no Lightning import): ckptio loads every plugin's entry point
when it resolves a URL.
"""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_integrations(register: Any) -> None:
    register("lightning", "ckptio_lightning:CkptioCheckpointIO")
