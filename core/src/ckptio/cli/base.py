"""What every subcommand shares: exit statuses, usage errors, storage options, the command record."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_CHECKPOINT = 1
EXIT_USAGE = 2
EXIT_PLUGIN = 3

#: The documented exit statuses (also printed by ``ckptio --help``).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_CHECKPOINT: "checkpoint error: not found, incomplete, damaged (verification failed), "
    "refused (protected step, destination exists), storage failure",
    EXIT_USAGE: "usage error: bad arguments, malformed URL or option",
    EXIT_PLUGIN: "a plugin, backend or format is missing or broken (the message says what to pip install)",
}

EPILOG = (
    "exit status:\n"
    + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    + (
        "\n\nenvironment:\n"
        "  CKPTIO_PLUGINS   comma-separated plugin names to load (unset: all installed; empty: none)\n"
        "  CKPTIO_PROGRESS  0 hides progress bars, 1 shows them even when stderr is not a terminal\n"
        "\nURLs: a path, file:///abs, s3://bucket/key, gs://, az://, msc://profile/key ...; a format rides\n"
        "on the scheme: safetensors+s3://bucket/key. See docs/cli.md."
    )
)


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, description, and two functions.

    ``add_arguments(parser)`` adds its own arguments; ``run(args, ctx)`` runs it and returns the
    exit status. Plugins register theirs with the ``register_commands`` hook, in the same shape.
    """

    name: str
    add_arguments: Callable[[Any], None]
    run: Callable[[Any, Any], int]
    help: str = ""
    description: str | None = None


# -- storage options -----------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, objects), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_options(pairs: Sequence[str] | None, blob: str | None) -> dict[str, Any]:
    """Merge ``--storage-options JSON`` with ``-o key=value`` pairs (dotted keys nest)."""
    opts: dict[str, Any] = {}
    if blob:
        try:
            loaded = json.loads(blob)
        except ValueError as exc:
            raise UsageError(f"--storage-options is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UsageError("--storage-options must be a JSON object")
        opts.update(loaded)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-o {pair!r}: expected KEY=VALUE")
        node = opts
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"-o {pair!r}: {part!r} is already set to a non-object value")
            node = child
        node[parts[-1]] = _parse_value(value)
    return opts
