"""``ckptio plugins``: what is installed, what each plugin provides, and what failed to load."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .base import EXIT_OK, EXIT_PLUGIN, Command
from .render import Context, names, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="exit 3 if any plugin failed to load")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..plugins import ALLOW_ENV, list_plugins

    infos = list_plugins()
    allow = os.environ.get(ALLOW_ENV)
    rows: list[dict[str, Any]] = []
    for p in infos:
        status = "error" if p.error else f"skipped by {ALLOW_ENV}" if p.skipped else "ok"
        d = p.as_dict()
        d["status"] = status
        rows.append(d)

    def text() -> str:
        body = table(
            [
                "PLUGIN",
                "DISTRIBUTION",
                "VERSION",
                "BACKENDS",
                "FORMATS",
                "ADDONS",
                "COMMANDS",
                "INTEGRATIONS",
                "STATUS",
            ],
            [
                [
                    r["name"],
                    r["distribution"] or "-",
                    r["version"] or "-",
                    names(r["backends"]),
                    names(r["formats"]),
                    names(r["addons"]),
                    names(r.get("commands", [])),
                    names(r.get("integrations", [])),
                    r["status"],
                ]
                for r in rows
            ],
        )
        errors = [f"{r['name']}: {r['error']}" for r in rows if r["error"]]
        head = f"{ALLOW_ENV}={allow!r}\n" if allow is not None else ""
        return head + body + ("\n\nload errors:\n  " + "\n  ".join(errors) if errors else "")

    ctx.emit({"allow_list": allow, "plugins": rows}, text)
    if args.check and any(r["error"] for r in rows):
        return EXIT_PLUGIN
    return EXIT_OK


COMMAND = Command(
    "plugins",
    add_arguments,
    run,
    help="list installed plugins and what they provide",
    description="List every ckptio plugin found through the 'ckptio' entry-point group: distribution, "
    "version, the backends/formats/addons/commands it registers, and load errors or CKPTIO_PLUGINS skips.",
)
