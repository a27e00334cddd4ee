"""Entry point of ``ckptio-safetensors``: registers the ``safetensors`` format, the read-only
``hf-cache://org/name`` backend (Hugging Face hub cache, offline) and the ``ckptio consolidate``
command.

All are registered as dotted strings, so loading this entry point (which every process using
ckptio does) imports neither the format nor the command-line code; each is imported when used.
"""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    register("safetensors", "ckptio_safetensors.format:SafetensorsFormat")


@hookimpl
def register_backends(register: Any) -> None:
    register("hf-cache", "ckptio_safetensors.hf_cache:open_hf_cache")


@hookimpl
def register_commands(register: Any) -> None:
    register(
        "consolidate",
        "ckptio_safetensors.cli:add_arguments",
        "ckptio_safetensors.cli:run",
        help="merge a checkpoint into HF safetensors shards (transformers' from_pretrained layout)",
        description="Write a checkpoint as model-0000i-of-0000N.safetensors + model.safetensors.index.json, "
        "loadable by transformers' from_pretrained. Provided by ckptio-safetensors.",
    )
