"""Lazy package exports (PEP 562), so that importing a plugin's entry point stays cheap.

Resolving any URL imports the entry-point module of every installed ckptio plugin
(``ckptio_fsspec.plugin``, ``ckptio_peft.plugin``...), and importing ``pkg.plugin`` runs
``pkg/__init__.py`` first. A package ``__init__`` that eagerly imports its implementation drags
fsspec, multi-storage-client or transformers into every save, even a local one: about a quarter
of a second per process here. Packages declare their public names with :func:`lazy_exports`
instead, and the first access to a name imports the one module that defines it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the
    module (relative to ``package``, or absolute) that defines it."""

    def __getattr__(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
