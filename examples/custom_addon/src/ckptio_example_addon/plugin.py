"""Entry point of ``ckptio-example-addon``: registers the ``run-info`` addon by name."""

from __future__ import annotations

from typing import Any

from ckptio.ext import hookimpl


@hookimpl
def register_addons(register: Any) -> None:
    # a "module:attr" string keeps `import ckptio` cheap: the class is imported on first use
    register("run-info", "ckptio_example_addon.addon:RunInfoAddon")
