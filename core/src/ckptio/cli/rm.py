"""``ckptio rm URL STEP...``: :meth:`ckptio.CheckpointManager.delete` for each step, checked first."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, RunLockedError
from .base import EXIT_OK, Command
from .render import Context


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url")
    p.add_argument("steps", nargs="+", type=int, metavar="STEP")
    p.add_argument("--force", action="store_true", help="also delete the newest committed step")
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take the run lock over from the process holding it (only once you know that job is gone)",
    )


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..manager import CheckpointManager

    mgr = CheckpointManager(args.url, storage_options=ctx.storage_options, takeover=args.takeover)
    deleted: list[int] = []
    remaining: list[int] = []
    busy: list[dict[str, Any]] = []
    try:
        # every step is checked before any is deleted: a typo deletes nothing
        all_steps = mgr.all_steps()  # committed or not, leftovers included
        if not all_steps:
            raise CheckpointNotFoundError(f"{mgr.root} holds no steps")
        unknown = [s for s in args.steps if s not in all_steps]
        if unknown:
            raise CheckpointNotFoundError(
                f"no step {', '.join(map(str, unknown))} under {mgr.root} "
                f"(steps: {', '.join(map(str, sorted(all_steps)))})"
            )
        protected = mgr.protected_steps()
        refused = [s for s in args.steps if s in protected and all_steps.get(s)]
        if refused and not args.force:
            raise CheckpointError(
                f"step {', '.join(map(str, refused))} is the newest committed step, which retention protects; "
                "pass --force to delete it anyway"
            )
        for s in dict.fromkeys(args.steps):
            try:
                done = mgr.delete(s, force=args.force)
            except RunLockedError as exc:
                raise RunLockedError(f"rm deleted nothing more: {exc}", holder=exc.holder) from exc
            busy += [
                {"step": s, "token": token, "holder": f"{body.get('host', '?')}/{body.get('pid', '?')}"}
                for token, body in done.busy.items()
            ]
            if done.removed:
                deleted.append(s)
        remaining = mgr.steps()
    finally:
        mgr.close()
    for b in busy:
        ctx.note(f"step {b['step']}: a save is being written by {b['holder']}; its files were left alone")

    def text() -> str:
        lines = [f"deleted step {s}" for s in deleted]
        lines += [f"step {b['step']}: being written by {b['holder']}, left alone" for b in busy]
        return "\n".join(lines) + f"\nremaining: {remaining or 'none'}"

    ctx.emit({"url": str(mgr.root), "deleted": deleted, "remaining": remaining, "busy": busy}, text)
    return EXIT_OK


COMMAND = Command(
    "rm",
    add_arguments,
    run,
    help="delete steps of a series",
    description="Delete steps under a CheckpointManager root. The newest committed step is protected (as "
    "retention protects it) unless --force. Leftovers of interrupted saves of a step go too; a save still "
    "running (live lease) is left alone. Refused while another live process holds the run lock, unless "
    "--takeover.",
)
