"""``ckptio ls URL``: the steps of a series, or one checkpoint's summary."""

from __future__ import annotations

import argparse
from typing import Any

from .base import EXIT_OK, Command
from .render import Context, human_bytes, iso, manifest_summary, metrics_text, summary_text, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url")
    p.add_argument(
        "--local",
        metavar="PATH",
        help="the local tier of a TieredCheckpointManager run (this node's directory): list the steps "
        "of both tiers, with a TIER column (local, durable or both)",
    )


def run(args: argparse.Namespace, ctx: Context) -> int:
    if getattr(args, "local", None):
        return _run_tiers(args, ctx)
    from ..checkpoint import find_format, open_backend, read_manifest
    from ..reading import open_series

    u, backend = open_backend(args.url, ctx.storage_options)
    m = read_manifest(backend, u.path)
    if m is not None:
        s = manifest_summary(m, str(u))
        ctx.emit({"kind": "checkpoint", **s}, lambda: summary_text(s))
        return EXIT_OK
    series = open_series(u, ctx.storage_options)
    if series is None:
        fmt = find_format(backend, u, None)  # raises not found / incomplete
        ctx.emit(
            {"kind": "foreign", "url": str(u), "format": fmt.name},
            lambda: f"{u}: a {fmt.name} checkpoint written by another tool (no manifest)",
        )
        return EXIT_OK
    mgr, all_steps = series
    try:
        latest = mgr.latest_step()
        steps = []
        for step, committed in all_steps.items():
            entry: dict[str, Any] = {
                "step": step,
                "url": str(mgr.url_of(step)),
                "committed": committed,
                "latest": step == latest,
            }
            if committed:
                sm = read_manifest(backend, mgr.url_of(step).path)
                if sm is not None:
                    entry.update(
                        format=sm.format,
                        bytes=sm.total_bytes,
                        files=len(sm.files),
                        metrics=dict(sm.metrics),
                        created=iso(sm.created),
                        world_size=sm.world_size,
                    )
            steps.append(entry)
    finally:
        mgr.close()

    def text() -> str:
        rows = [
            [
                e["step"],
                "yes" if e["committed"] else "NO (incomplete)",
                human_bytes(e["bytes"]) if "bytes" in e else "-",
                e.get("format", "-"),
                e.get("world_size", "-"),
                e.get("created") or "-",
                metrics_text(e.get("metrics", {})) or "-",
                "latest" if e["latest"] else "",
            ]
            for e in steps
        ]
        return f"{u}\n" + table(
            ["STEP", "COMMITTED", "SIZE", "FORMAT", "RANKS", "CREATED", "METRICS", ""], rows
        )

    ctx.emit({"kind": "series", "url": str(u), "latest": latest, "steps": steps}, text)
    return EXIT_OK


def _run_tiers(args: argparse.Namespace, ctx: Context) -> int:
    """``ckptio ls ROOT --local PATH``: the storage options are the durable tier's."""
    from ..tiered import describe_tiers

    info = describe_tiers(args.url, args.local, storage_options=ctx.storage_options)
    for e in info["steps"]:
        if "created" in e:
            e["created"] = iso(e["created"])

    def text() -> str:
        rows = [
            [
                e["step"],
                e["tier"],
                "yes" if e["committed"] else "NO (incomplete)",
                human_bytes(e["bytes"]) if "bytes" in e else "-",
                e.get("format", "-"),
                e.get("world_size", "-"),
                e.get("created") or "-",
                metrics_text(e.get("metrics", {})) or "-",
                "latest" if e["latest"] else "",
            ]
            for e in info["steps"]
        ]
        headers = ["STEP", "TIER", "COMMITTED", "SIZE", "FORMAT", "RANKS", "CREATED", "METRICS", ""]
        return f"{info['url']} (local tier: {info['local']})\n" + table(headers, rows)

    ctx.emit(info, text)
    return EXIT_OK


COMMAND = Command(
    "ls",
    add_arguments,
    run,
    help="list the steps of a series, or summarise one checkpoint",
    description="For a CheckpointManager root: every step, committed or not, its size, metrics, and which is "
    "latest. For a single checkpoint: its manifest summary. With --local PATH (a TieredCheckpointManager "
    "run): the steps of both tiers and where each one lives.",
)
