"""``ckptio consolidate SRC DST``: the command-line face of :func:`consolidate`.

The core CLI delegates to :func:`add_consolidate_arguments` and :func:`run_consolidate`, so the
options live next to the code they drive.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ckptio.errors import CheckpointError


def add_consolidate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``consolidate`` arguments to ``parser`` (a subcommand parser)."""
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
    parser.add_argument("--group", default=None, help="top-level state entry to export (default: model)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum checks while reading")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a destination that is not empty, whole and atomically (default: refuse it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run_consolidate(args: argparse.Namespace) -> int:
    """Run a parsed ``consolidate`` command; returns the exit status (errors are printed)."""
    from .consolidation import consolidate

    t0 = time.perf_counter()
    try:
        index = consolidate(
            args.src,
            args.dst,
            max_shard_size=args.shard_size,
            cast_dtype=args.dtype,
            workers=args.workers,
            reference_index=args.reference_index,
            dtype_reference=getattr(args, "dtype_reference", None),
            group=getattr(args, "group", None),
            verify=not getattr(args, "no_verify", False),
            overwrite=bool(getattr(args, "overwrite", False)),
            storage_options=sopts
            if isinstance(sopts := getattr(args, "storage_options", None), dict)
            else None,
            progress=not getattr(args, "no_progress", False) and not args.json,
        )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    total = index["metadata"]["total_size"]
    files = sorted(set(index["weight_map"].values()))
    if args.json:
        print(
            json.dumps(
                {
                    "dst": args.dst,
                    "files": files,
                    "tensors": len(index["weight_map"]),
                    "total_size": total,
                    "seconds": round(seconds, 3),
                }
            )
        )
    else:
        print(
            f"wrote {len(files)} file(s), {len(index['weight_map'])} tensors, {total / 1e9:.3f} GB "
            f"to {args.dst} in {seconds:.1f}s"
        )
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
