"""The ``ckptio`` command line: look at, check, copy and prune checkpoints on any storage.

Every subcommand takes ``--json`` (one JSON document on stdout, for scripts), ``-v`` (log INFO
lines, ``-vv`` for DEBUG, on stderr), ``--no-progress`` and storage options for the backend
(``-o key=value``, dotted keys nest: ``-o client_kwargs.endpoint_url=http://...``, or a whole JSON
object with ``--storage-options``). The exit status is part of the interface, see
:data:`EXIT_CODES`.

The commands are thin: the work is done by the library (:func:`ckptio.copy`,
:meth:`ckptio.CheckpointManager.delete`, :func:`ckptio.reading.locate`...), and this package
only parses, prints and maps errors to exit statuses. One module per command (``ls``,
``inspect``, ``verify``, ``cp``, ``rm``, ``plugins``, ``demo``), output helpers in
:mod:`~ckptio.cli.render`. Plugins add commands with the ``register_commands`` hook
(``ckptio consolidate`` comes from ckptio-safetensors); a plugin's command-line code, like the
demo's, is imported only when its command runs, so a missing or broken plugin never breaks the
other commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import progress as _progress
from ..errors import CheckpointError, InvalidURLError, PluginError
from ..logging_utils import cli_logging
from ..reading import state_path as _state_path  # noqa: F401  (kept for callers of the old module)
from . import cp, demo, inspect, ls, plugins, rm, verify
from .base import (
    EPILOG,
    EXIT_CHECKPOINT,
    EXIT_CODES,
    EXIT_OK,
    EXIT_PLUGIN,
    EXIT_USAGE,
    Command,
    UsageError,
    parse_storage_options,
)
from .render import Context, Ctx, human_bytes

log = logging.getLogger("ckptio.cli")

#: The core's own commands, in the order ``ckptio --help`` lists them (plugins' come after).
CORE_COMMANDS: tuple[Command, ...] = (
    plugins.COMMAND,
    ls.COMMAND,
    inspect.COMMAND,
    verify.COMMAND,
    cp.COMMAND,
    rm.COMMAND,
)

__all__ = [
    "CORE_COMMANDS",
    "EPILOG",
    "EXIT_CHECKPOINT",
    "EXIT_CODES",
    "EXIT_OK",
    "EXIT_PLUGIN",
    "EXIT_USAGE",
    "Command",
    "Context",
    "Ctx",
    "UsageError",
    "build_parser",
    "human_bytes",
    "main",
    "parse_storage_options",
    "run",
]


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log INFO lines (-vv: DEBUG) on stderr")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (also CKPTIO_PROGRESS=0)")
    g.add_argument(
        "-o",
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="backend option; dotted keys nest (client_kwargs.endpoint_url=http://...); values are JSON if they parse",
    )
    g.add_argument(
        "--storage-options", metavar="JSON", default=None, help="backend options as one JSON object"
    )
    return p


def _subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _missing(name: str, dist: str) -> Any:
    """``(add_arguments, run)`` loader of a known command whose plugin is not installed."""

    def load() -> tuple[Any, Any]:
        raise PluginError(
            f"ckptio {name} is provided by a plugin that is not installed (or not loaded, see "
            f"CKPTIO_PLUGINS): pip install {dist}"
        )

    return load


def _extensions() -> list[tuple[str, str, str | None, Any]]:
    """``(name, help, description, loader)`` of every command beyond the core's: plugins',
    known ones whose plugin is missing, and the demo. ``loader()`` returns ``(add_arguments, run)``."""
    from ..plugins import INSTALL_HINTS, command_specs, load_command

    out: list[tuple[str, str, str | None, Any]] = []
    core = {c.name for c in CORE_COMMANDS} | {demo.NAME}
    try:
        specs = command_specs()
    except Exception as exc:  # the registry itself failed: the core's commands still work
        log.warning("plugin commands unavailable: %s", exc)
        specs = {}
    for name, spec in specs.items():
        if name in core:
            log.warning("plugin %r registers command %r, which is ckptio's own; ignored", spec.plugin, name)
            continue
        out.append((name, spec.help, spec.description, lambda spec=spec: load_command(spec)))
    for name, dist in sorted(INSTALL_HINTS.get("command", {}).items()):
        if name not in specs and name not in core:
            out.append((name, f"(needs a plugin: pip install {dist})", None, _missing(name, dist)))
    out.append((demo.NAME, demo.HELP, demo.DESCRIPTION, lambda: (demo.add_arguments, demo.run)))
    return out


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. ``argv`` decides which optional command code gets imported: only the
    command it names has its plugin (or demo) module imported for its arguments."""
    from .. import __version__

    common = _common()
    parser = argparse.ArgumentParser(
        prog="ckptio",
        description="Look at, verify, copy, convert and prune ckptio checkpoints on any storage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, description: str | None, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(  # type: ignore[no-any-return]
            name,
            parents=[common],
            help=help_text,
            description=description or help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    for cmd in CORE_COMMANDS:
        p = add(cmd.name, cmd.help, cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _load_error=None)
    wanted = _subcommand(argv)
    for name, help_text, description, loader in _extensions():
        # an optional command's own arguments may repeat common ones (--json): theirs win
        p = add(name, help_text, description, conflict_handler="resolve")
        run_fn = None
        load_error: PluginError | None = None
        if name == wanted:
            try:
                add_arguments, run_fn = loader()
                add_arguments(p)
            except PluginError as exc:
                load_error = exc
            except Exception as exc:  # a broken optional command becomes exit 3, never a crash
                load_error = PluginError(f"{name}: {type(exc).__name__}: {exc}")
        if run_fn is None or load_error is not None:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(_run=run_fn, _load_error=load_error)
    return parser


def _exit_for(exc: BaseException) -> int:
    if isinstance(exc, PluginError):
        return EXIT_PLUGIN
    if isinstance(exc, (InvalidURLError, UsageError)):
        return EXIT_USAGE
    return EXIT_CHECKPOINT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    want_json = bool(args.json)
    ctx = Context(json=want_json, storage_options={}, out=sys.stdout, err=sys.stderr)
    _progress.set_enabled(False if args.no_progress else None)
    try:
        with cli_logging(args.verbose):
            if args._load_error is not None:
                raise args._load_error
            ctx.storage_options = parse_storage_options(args.storage_option, args.storage_options)
            return int(args._run(args, ctx) or 0)
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return 130
    except (CheckpointError, UsageError, OSError) as exc:
        code = _exit_for(exc)
        if want_json:
            ctx.emit({"error": str(exc), "error_type": type(exc).__name__, "exit_code": code}, lambda: "")
        ctx.note(f"ckptio {args.command}: error: {exc}")
        return code
    finally:
        _progress.set_enabled(None)


def run() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())
