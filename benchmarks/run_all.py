"""Run every ``benchmarks/bench_*.py`` module's ``main`` in its own subprocess (``make bench``).

A failing or hanging module is reported and the others still run. The exit status is 1 if any module failed.
Options: ``--scale X`` (exported as $CKPTIO_BENCH_SCALE to every module), ``--only NAME[,NAME]`` (module names
without ``bench_``), ``--timeout S`` per module.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SCALE_ENV = "CKPTIO_BENCH_SCALE"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=None, help=f"size factor, exported as ${SCALE_ENV}")
    p.add_argument("--only", default="", help="comma-separated module names, e.g. local")
    p.add_argument("--timeout", type=float, default=45 * 60, help="seconds per module")
    args = p.parse_args(argv)

    env = dict(os.environ)
    if args.scale is not None:
        env[SCALE_ENV] = str(args.scale)
    only = {x.strip().removeprefix("bench_") for x in args.only.split(",") if x.strip()}
    modules = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        modules = [m for m in modules if m.stem.removeprefix("bench_") in only]
    if not modules:
        print("no benchmark modules found", file=sys.stderr)
        return 1

    results: list[tuple[str, str, float]] = []
    for mod in modules:
        print(f"=== {mod.stem} ===", flush=True)
        code = (
            f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import {mod.stem} as m; "
            f"sys.argv = [{str(mod)!r}]; sys.exit(m.main())"
        )
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, "-c", code], env=env, timeout=args.timeout).returncode
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (timeout after {args.timeout:.0f}s)"
        except OSError as e:
            status = f"FAILED ({e})"
        results.append((mod.stem, status, time.perf_counter() - t0))

    print("\n=== benchmark summary ===")
    for name, status, secs in results:
        print(f"{name:<24} {status:<32} {secs:7.1f} s")
    return 0 if all(s == "ok" for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
