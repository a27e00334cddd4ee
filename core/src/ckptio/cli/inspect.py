"""``ckptio inspect URL``: manifest fields, files, addon artifacts and every stored entry."""

from __future__ import annotations

import argparse
import fnmatch
from typing import Any

from .base import EXIT_OK, Command
from .render import Context, human_bytes, manifest_summary, summary_text, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url")
    p.add_argument("--step", type=int, default=None, help="a step of a series root (default: latest)")
    p.add_argument(
        "--filter", metavar="GLOB", default=None, help="only tensor names matching GLOB (e.g. 'model.*')"
    )


def group_tensors(entries: list[Any]) -> list[dict[str, Any]]:
    """One row per stored name (chunks of a sharded tensor are summed)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        row = out.setdefault(
            e.name,
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bytes": 0, "files": [], "chunks": 0},
        )
        row["bytes"] += int(e.nbytes)
        row["chunks"] += 1
        if e.file not in row["files"]:
            row["files"].append(e.file)
    return sorted(out.values(), key=lambda r: r["name"])


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..reading import locate

    loc = locate(args.url, step=args.step, storage_options=ctx.storage_options)
    try:
        if loc.via_root:
            ctx.note(f"{loc.via_root} is a checkpoint series; inspecting step {loc.step}")
        tensors = group_tensors(loc.fmt.tensors(loc.backend, loc.url.path, loc.manifest))
    finally:
        loc.close()
    if args.filter:
        tensors = [t for t in tensors if fnmatch.fnmatchcase(t["name"], args.filter)]
    data: dict[str, Any] = {
        "url": str(loc.url),
        "format": loc.fmt.name,
        "manifest": None,
        "tensors": tensors,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
    }
    m = loc.manifest
    if m is not None:
        data["manifest"] = {
            **manifest_summary(m, str(loc.url)),
            "file_list": {name: dict(info) for name, info in sorted(m.files.items())},
            "checksum_scheme": "xxh3_64",
        }
        data["addons"] = list(m.addons)

    def text() -> str:
        parts = []
        if m is not None:
            parts.append(summary_text(data["manifest"]))
            data_files = {f for t in tensors for f in t["files"]}
            extra = [n for n in sorted(m.files) if n not in data_files]
            if extra and not args.filter:
                parts.append("artifacts   " + ", ".join(extra))
        else:
            parts.append(
                f"checkpoint  {loc.url}\nformat      {loc.fmt.name} (no manifest: written by another tool)"
            )
        rows = [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                human_bytes(t["bytes"]),
                ",".join(t["files"]) + (f" ({t['chunks']} chunks)" if t["chunks"] > 1 else ""),
            ]
            for t in tensors
        ]
        parts.append(f"\n{len(tensors)} entries, {human_bytes(data['tensor_bytes'])}")
        if rows:
            parts.append(table(["NAME", "DTYPE", "SHAPE", "SIZE", "FILE"], rows))
        return "\n".join(parts)

    ctx.emit(data, text)
    return EXIT_OK


COMMAND = Command(
    "inspect",
    add_arguments,
    run,
    help="show tensors, metadata and addons of a checkpoint",
    description="Tensors (name, dtype, shape, bytes, file), manifest fields and addons. A series root shows "
    "its newest committed step (or --step).",
)
