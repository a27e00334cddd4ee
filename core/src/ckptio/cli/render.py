"""How subcommands print: one JSON document with ``--json``, tables and summaries for people."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Context:
    """What every subcommand's ``run(args, ctx)`` gets besides its own arguments (plugins' too).

    :ivar json: ``--json`` was given: print exactly one JSON document on stdout.
    :ivar storage_options: backend options from ``-o``/``--storage-options``.
    """

    json: bool
    storage_options: dict[str, Any]
    out: Any  # text stream for results (stdout)
    err: Any  # text stream for messages (stderr)

    def emit(self, data: Any, text: Callable[[], str]) -> None:
        """Print ``data`` as JSON with ``--json``, else the human text."""
        if self.json:
            self.out.write(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
        else:
            body = text()
            if body:
                self.out.write(body if body.endswith("\n") else body + "\n")
        self.out.flush()

    def note(self, message: str) -> None:
        """A remark for a person (stderr, so JSON on stdout stays clean)."""
        self.err.write(message + "\n")
        self.err.flush()


#: The former name of :class:`Context`.
Ctx = Context


def jsonable(x: Any) -> Any:
    """``x`` with every value JSON can hold as is; the rest as strings (NaN as ``"nan"``)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, as ``ls -h`` shows them)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def iso(ts: float | None) -> str | None:
    """A timestamp as local ISO 8601 (``None`` stays ``None``)."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; ``None`` cells are empty."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def names(items: Sequence[str], limit: int = 8) -> str:
    """A short comma list for tables (``--json`` has them all)."""
    if not items:
        return "-"
    shown = ",".join(items[:limit])
    return shown + (f",... (+{len(items) - limit})" if len(items) > limit else "")


def metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


def manifest_summary(m: Any, url: str) -> dict[str, Any]:
    """The facts ``ls`` and ``inspect`` show about one committed checkpoint."""
    return {
        "url": url,
        "format": m.format,
        "step": m.step,
        "world_size": m.world_size,
        "files": len(m.files),
        "bytes": m.total_bytes,
        "created": iso(m.created),
        "metrics": dict(m.metrics),
        "addons": list(m.addons),
        "user": dict(m.metadata),
    }


def summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {s['url']}",
        f"format      {s['format']}",
        f"step        {s['step'] if s['step'] is not None else '-'}",
        f"world size  {s['world_size']}",
        f"files       {s['files']} ({human_bytes(s['bytes'])}, {s['bytes']} bytes)",
        f"created     {s['created']}",
    ]
    if s["metrics"]:
        lines.append(f"metrics     {metrics_text(s['metrics'])}")
    if s["addons"]:
        lines.append(f"addons      {', '.join(s['addons'])}")
    if s["user"]:
        lines.append(f"metadata    {json.dumps(s['user'], sort_keys=True)}")
    return "\n".join(lines)
