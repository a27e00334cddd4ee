"""``ckptio demo``: the end-to-end demonstration (:mod:`ckptio.demo`), imported only when it runs.

The demo trains a model, so its module pulls in more than the other commands need; a demo that
fails to import is exit status 3 for ``ckptio demo`` and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..errors import PluginError
from .base import Command
from .render import Context

NAME = "demo"
HELP = "run the end-to-end demo"
DESCRIPTION = "A short end-to-end demonstration of ckptio on this machine (make demo)."


def _module() -> Any:
    try:
        return importlib.import_module("ckptio.demo")
    except Exception as exc:
        raise PluginError(f"the demo failed to import: {type(exc).__name__}: {exc}") from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    _module().add_arguments(p)


def run(args: argparse.Namespace, ctx: Context) -> int:
    return int(_module().run(args))


COMMAND = Command(NAME, add_arguments, run, help=HELP, description=DESCRIPTION)
