"""``ckptio cp SRC DST``: :func:`ckptio.copy` on the command line (copy, or convert formats)."""

from __future__ import annotations

import argparse

from .base import EXIT_OK, Command, parse_storage_options
from .render import Context, human_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--format", default=None, help="destination format (default: DST's prefix, else the source's)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="re-save as one full (unsharded) checkpoint even if the format is unchanged",
    )
    p.add_argument("--step", type=int, default=None, help="a step of a series root (default: latest)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a committed checkpoint at DST (a directory that is not a checkpoint is never replaced)",
    )
    p.add_argument(
        "--dst-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="backend option for DST only (like -o)",
    )
    p.add_argument("--dst-storage-options", metavar="JSON", default=None, help="backend options for DST only")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..copying import copy

    dst_opts = parse_storage_options(args.dst_option, args.dst_storage_options)
    result = copy(
        args.src,
        args.dst,
        format=args.format,
        overwrite=args.overwrite,
        storage_options=ctx.storage_options,
        dst_storage_options=dst_opts,
        step=args.step,
        full=args.full,
    )
    if result.via_root:
        ctx.note(f"{result.via_root} is a checkpoint series; copied step {result.step}")

    def text() -> str:
        how = "copied" if result.mode == "files" else f"converted to {result.format}"
        return (
            f"{how}: {result.src} -> {result.dst} ({human_bytes(result.bytes)} in {result.seconds:.2f}s, "
            f"{result.gbps:.2f} GB/s)"
        )

    ctx.emit(result.as_dict(), text)
    return EXIT_OK


COMMAND = Command(
    "cp",
    add_arguments,
    run,
    help="copy or convert a checkpoint between URLs and formats",
    description="Copy SRC to DST. With the same format, files are copied as they are (layout and checksums "
    "kept; every checksum is verified before the copy is published). With another format (--format or a "
    "'fmt+' prefix on DST) or --full, the checkpoint is saved anew with full, unsharded tensors, streaming: "
    "each tensor is read when it is written, so memory holds a few tensors, never the whole checkpoint. "
    "A series root as SRC copies its newest committed step (or --step).",
)
