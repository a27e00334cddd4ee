"""Entry point of ``ckptio-transformers``: the ``transformers`` integration (``CkptioTrainer``).

Registering costs nothing: the trainer is named by a dotted string and imported on first use.
"""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_integrations(register: Any) -> None:
    register("transformers", "ckptio_transformers:CkptioTrainer")
