"""Multi-tier checkpoints: a local disk tier drained to S3 (moto), and restores from either tier.

``TieredCheckpointManager(s3://..., local=<disk>, async_save=True)`` on an LLM-shaped state of about
1 GB (``--gb``, or ``$CKPTIO_BENCH_TIERED_GB``; ``$CKPTIO_BENCH_SCALE`` scales it too). Each phase
runs in a fresh process (``common.run_worker``):

* ``save``: ``--saves`` saves. Per save: the time ``save()`` blocks the training thread (staging
  into host memory), the time until the step is committed on the local tier (``wait()``), and the
  time until it is on S3 (``wait(durable=True)``), each from the start of the save.
* ``restore-local``: a new process restores the newest step; every byte comes from the local tier.
* ``restore-s3``: a new process with an empty local directory (a replaced node) restores the same
  step; every byte comes from S3.

Target (printed PASS/FAIL): the restore from the local tier is at least 3x faster than from S3.
Moto is one Python process on this machine, so the S3 numbers say little about real S3; the local
restore reads files written moments before (the page cache, unless caches can be dropped, which
needs root: the table says which).

Run: ``.venv/bin/python benchmarks/bench_tiered.py [--gb 1.0] [--saves 2] [--reps 2]``.
Writes ``benchmarks/results/tiered.md`` and ``tiered.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TARGET = 3.0
SIZE_ENV = "CKPTIO_BENCH_TIERED_GB"
BUCKET = "ckptio-bench-tiered"


def _scale(gb: float) -> float:
    return gb * common.GB / common.spec_nbytes(common.llm_spec(1.0))


def _worker(task: dict[str, Any]) -> None:
    import ckptio

    scale = task["scale"]
    root = f"s3://{BUCKET}/run"
    opts = common.moto_storage_options(task["endpoint"])
    if task["phase"] == "save":
        state = common.make_state_dict(scale)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        blocked, local, durable = [], [], []
        with ckptio.TieredCheckpointManager(
            root,
            local=task["local"],
            async_save=True,
            storage_options=opts,
            local_retention=ckptio.KeepLatest(1),
        ) as mgr:
            for step in range(1, task["saves"] + 1):
                t0 = time.perf_counter()
                mgr.save(step, state)
                t1 = time.perf_counter()
                mgr.wait()
                t2 = time.perf_counter()
                mgr.wait(durable=True)
                t3 = time.perf_counter()
                blocked.append(t1 - t0)
                local.append(t2 - t0)
                durable.append(t3 - t0)
            locations = {str(k): sorted(v) for k, v in mgr.step_locations().items()}
        common.emit_result(
            {
                "bytes": nbytes,
                "blocked_s": blocked,
                "local_s": local,
                "durable_s": durable,
                "locations": locations,
            }
        )
        return
    state = common.make_state_dict(scale, zeros=True)
    cold = common.drop_caches()
    with ckptio.TieredCheckpointManager(root, local=task["local"], storage_options=opts) as mgr:
        t0 = time.perf_counter()
        result = mgr.load(state)
        seconds = time.perf_counter() - t0
    ok, why = common.verify_state_dict(state, scale)
    common.emit_result(
        {
            "seconds": seconds,
            "tier_bytes": result.tier_bytes,
            "step": result.step,
            "correct": ok,
            "why": why,
            "cold": cold,
        }
    )


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_gb = float(os.environ.get(SIZE_ENV) or 1.0 * common.default_scale())
    ap.add_argument(
        "--gb", type=float, default=default_gb, help=f"state size in GB (default 1.0, ${SIZE_ENV})"
    )
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="restores from each tier")
    ap.add_argument("--work-dir", default=str(common.DEFAULT_WORK_DIR))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    work = Path(args.work_dir) / "tiered"
    common.remove(work)
    work.mkdir(parents=True)
    facts = common.machine_facts(work)
    proc, ep = common.start_moto(work / "moto.log")
    try:
        common.moto_s3_client(ep).create_bucket(Bucket=BUCKET)
        base = {"scale": _scale(args.gb), "endpoint": ep}
        save = common.run_worker(
            Path(__file__), {**base, "phase": "save", "local": str(work / "nvme"), "saves": args.saves}, 1800
        )
        if not save.get("ok"):
            print(f"save: FAILED {save.get('error')}")
            return 1
        print(
            f"save: blocked {[round(x, 3) for x in save['blocked_s']]} s, local {[round(x, 2) for x in save['local_s']]}"
            f" s, durable {[round(x, 2) for x in save['durable_s']]} s"
        )
        restores: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
        for rep in range(args.reps):
            for kind in ("local", "s3"):
                local = str(work / "nvme") if kind == "local" else str(work / f"empty{rep}")
                res = common.run_worker(Path(__file__), {**base, "phase": "restore", "local": local}, 1800)
                if not res.get("ok"):
                    print(f"restore from {kind}: FAILED {res.get('error')}")
                    return 1
                print(
                    f"restore from {kind}: {res['seconds']:.2f} s, tiers {res['tier_bytes']}, correct {res['correct']}"
                )
                restores[kind].append(res)
    finally:
        common.stop_moto(proc)
        common.remove(work)
    load_end = common.loadavg()
    gb = save["bytes"] / common.GB
    t_local = _median([r["seconds"] for r in restores["local"]])
    t_s3 = _median([r["seconds"] for r in restores["s3"]])
    ratio = t_s3 / t_local if t_local > 0 else float("nan")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    pure = all(r["tier_bytes"]["durable"] == 0 for r in restores["local"]) and all(
        r["tier_bytes"]["local"] == 0 for r in restores["s3"]
    )
    correct = all(r["correct"] for rs in restores.values() for r in rs)
    cold = all(r["cold"] for rs in restores.values() for r in rs)
    rows = []
    for i, (b, lo, du) in enumerate(zip(save["blocked_s"], save["local_s"], save["durable_s"]), 1):
        rows.append([f"save {i}", common.fmt(b, 3), common.fmt(lo, 2), common.fmt(du, 2), "", ""])
    for kind, label in (
        ("local", "restore from the local tier"),
        ("s3", "restore from S3 (empty local tier)"),
    ):
        t = _median([r["seconds"] for r in restores[kind]])
        rows.append([label, "", "", "", common.fmt(t, 2), common.fmt(gb / t, 2)])
    table = common.markdown_table(
        [
            "",
            "blocked in save() (s)",
            "until committed locally (s)",
            "until on S3 (s)",
            "restore, median (s)",
            "restore GB/s",
        ],
        rows,
    )
    summary = (
        f"restore from the local tier {common.fmt(t_local, 2)} s vs from S3 {common.fmt(t_s3, 2)} s: "
        f"{common.fmt(ratio, 1)}x (target >= {TARGET:.0f}x) -> {verdict}"
    )
    md = "\n".join(
        [
            "# Multi-tier checkpoints: local disk tier, S3 (moto) durable tier",
            "",
            f"State: {gb:.2f} GB LLM-shaped, `TieredCheckpointManager(async_save=True)`, {args.saves} saves, "
            f"{args.reps} restores from each tier, each phase in a fresh process. Local tier: {facts.get('work_fs')}; "
            f"durable tier: moto_server on 127.0.0.1. Load average: {common.fmt(facts.get('loadavg_start'))} at start, "
            f"{common.fmt(load_end)} at end ({facts.get('cpus')} CPUs). Restores {'cold (caches dropped)' if cold else 'NOT cold (page cache: dropping caches needs root)'}; "
            f"bytes {'all' if pure else 'NOT all'} from the tier named; values {'correct' if correct else 'WRONG'}.",
            "",
            table,
            "",
            f"**{summary}**",
            "",
            '"blocked" is the time the training thread spends in `save()` (the copy into reused host buffers); '
            '"until committed locally" and "until on S3" are measured from the start of the save (`wait()` and '
            "`wait(durable=True)`). The first save also allocates the reused host buffers and takes both tiers' "
            "run locks. Moto is one Python process (ranged GETs copy whole objects): S3 times here are moto's, "
            "not a real store's.",
            "",
        ]
    )
    print(md)
    data = {
        "facts": facts,
        "loadavg_end": load_end,
        "gb": gb,
        "save": save,
        "restores": restores,
        "ratio": ratio,
        "target": TARGET,
        "verdict": verdict,
        "cold": cold,
        "correct": correct,
    }
    common.write_results("tiered", md, data)
    return 0 if verdict == "PASS" and correct and pure else 1


if __name__ == "__main__":
    sys.exit(main())
