"""``ckptio consolidate SRC DST``: the command-line face of :func:`consolidate`.

The command is registered with ckptio's ``register_commands`` hook (see :mod:`.plugin`): ckptio
adds its common options (``--json``, ``-v``, ``--no-progress``, ``-o``/``--storage-options``) and
calls :func:`add_arguments` and :func:`run`, which keeps the options next to the code they
drive. A checkpoint error raised here becomes ckptio's exit status 1 (3 for a missing plugin).
:func:`main` runs the same command on its own (``python -m ckptio_safetensors.cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ckptio.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``consolidate`` arguments to ``parser`` (ckptio's subcommand parser)."""
    parser.add_argument(
        "src", help="checkpoint to consolidate (ckptio safetensors/native, or a sharded HF dir)"
    )
    parser.add_argument("dst", help="output directory (any backend URL)")
    parser.add_argument(
        "--shard-size", default="5GB", help="max bytes per output file, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument("--dtype", default=None, help="cast ordinary float tensors: bf16, fp16 or fp32")
    parser.add_argument("--workers", type=int, default=4, help="tensors assembled in parallel (default 4)")
    parser.add_argument(
        "--reference-index", default=None, help="a base model's model.safetensors.index.json to mirror"
    )
    parser.add_argument(
        "--dtype-reference", default=None, help="a base HF directory whose per-tensor dtypes to restore"
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH_OR_DIR",
        help="config.json (or a directory with config.json and generation_config.json, e.g. the base "
        "model) to write beside the weights; default: the checkpoint's own, when it has one",
    )
    parser.add_argument("--group", default=None, help="top-level state entry to export (default: model)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum checks while reading")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a destination that is not empty, whole and atomically (default: refuse it)",
    )


def add_consolidate_arguments(parser: argparse.ArgumentParser) -> None:
    """:func:`add_arguments` plus ``--no-progress`` and ``--json``, for a parser of its own."""
    add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _consolidate(
    args: argparse.Namespace, storage_options: dict[str, Any] | None, progress: bool
) -> tuple[dict[str, Any], Callable[[], str]]:
    """Run it; returns the result as JSON data and as a line of text."""
    from .consolidation import consolidate

    t0 = time.perf_counter()
    index = consolidate(
        args.src,
        args.dst,
        max_shard_size=args.shard_size,
        cast_dtype=args.dtype,
        workers=args.workers,
        reference_index=args.reference_index,
        dtype_reference=getattr(args, "dtype_reference", None),
        config=getattr(args, "config", None),
        group=getattr(args, "group", None),
        verify=not getattr(args, "no_verify", False),
        overwrite=bool(getattr(args, "overwrite", False)),
        storage_options=storage_options or None,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    total = index["metadata"]["total_size"]
    files = sorted(set(index["weight_map"].values()))
    data = {
        "dst": args.dst,
        "files": files,
        "tensors": len(index["weight_map"]),
        "total_size": total,
        "seconds": round(seconds, 3),
    }

    def text() -> str:
        return (
            f"wrote {len(files)} file(s), {len(index['weight_map'])} tensors, {total / 1e9:.3f} GB "
            f"to {args.dst} in {seconds:.1f}s"
        )

    return data, text


def run(args: argparse.Namespace, ctx: Any) -> int:
    """``ckptio consolidate``: ``ctx`` is ckptio's command context (``json``, ``storage_options``,
    ``emit``); errors are left to ckptio, which maps them to its exit statuses."""
    progress = not getattr(args, "no_progress", False) and not ctx.json
    data, text = _consolidate(args, ctx.storage_options, progress)
    ctx.emit(data, text)
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    """Run a ``consolidate`` command parsed with :func:`add_consolidate_arguments`; returns the
    exit status (errors are printed)."""
    sopts = getattr(args, "storage_options", None)
    try:
        data, text = _consolidate(
            args, sopts if isinstance(sopts, dict) else None, not args.no_progress and not args.json
        )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data) if args.json else text())
    return 0


#: alias named in the design discussion
main_consolidate = run_consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ckptio-consolidate", description="Consolidate a checkpoint into HF safetensors"
    )
    add_consolidate_arguments(parser)
    return run_consolidate(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
