"""Entry point of ``ckptio-safetensors``: registers the ``safetensors`` format."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    register("safetensors", "ckptio_safetensors.format:SafetensorsFormat")
