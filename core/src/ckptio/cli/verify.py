"""``ckptio verify URL``: re-read every byte and check it against the manifest's checksums."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import progress as _progress
from ..errors import CheckpointError, CheckpointNotFoundError, PluginError
from .base import EXIT_CHECKPOINT, EXIT_OK, Command
from .render import Context, human_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url")
    p.add_argument("--latest", action="store_true", help="for a series root: only the newest committed step")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..api import verify
    from ..checkpoint import find_format, open_backend, read_manifest
    from ..reading import open_series

    u, backend = open_backend(args.url, ctx.storage_options)
    targets: list[tuple[Any, int]] = []  # (url, expected bytes)
    m = read_manifest(backend, u.path)
    if m is not None:
        targets.append((u, m.total_bytes))
    else:
        series = open_series(u, ctx.storage_options)
        if series is None:
            find_format(backend, u, None)  # raises "not found" / "incomplete" with the right message
            raise CheckpointError(f"{u} has no manifest (written by another tool): nothing to verify against")
        mgr, all_steps = series
        try:
            committed = mgr.steps()
            if not committed:
                raise CheckpointNotFoundError(
                    f"no committed step under {u} (incomplete: {sorted(all_steps)})"
                )
            for s in [committed[-1]] if args.latest else committed:
                sm = read_manifest(backend, mgr.url_of(s).path)
                targets.append((mgr.url_of(s), sm.total_bytes if sm else 0))
        finally:
            mgr.close()
    results = []
    total = sum(n for _, n in targets)
    with _progress.progress(total, "verify") as bar:
        for tu, nbytes in targets:
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"url": str(tu)}
            try:
                checked = verify(str(tu), storage_options=ctx.storage_options)
                entry.update(ok=True, bytes_checked=checked)
            except PluginError:
                raise
            except CheckpointError as exc:
                entry.update(ok=False, error=str(exc), error_type=type(exc).__name__)
            entry["seconds"] = round(time.perf_counter() - t0, 4)
            results.append(entry)
            bar.update(nbytes)
    ok = all(r["ok"] for r in results)

    def text() -> str:
        lines = []
        for r in results:
            if r["ok"]:
                lines.append(
                    f"OK      {r['url']}  ({human_bytes(r['bytes_checked'])} checked in {r['seconds']:.2f}s)"
                )
            else:
                lines.append(f"FAILED  {r['url']}: {r['error']}")
        return "\n".join(lines)

    ctx.emit({"ok": ok, "results": results}, text)
    return EXIT_OK if ok else EXIT_CHECKPOINT


COMMAND = Command(
    "verify",
    add_arguments,
    run,
    help="re-read and check every byte against the manifest",
    description="Check sizes and checksums of every file of a checkpoint. For a series root, check every "
    "committed step (or only the newest with --latest). Exit 1 if anything is damaged.",
)
