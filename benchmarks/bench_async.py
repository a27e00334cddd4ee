"""How long does training block in an asynchronous save?

Target (issue 6): on the second and later saves of an LLM-shaped state (~1.5 GB by default),
``CheckpointManager(async_save=True).save()`` blocks for at most 30% of a synchronous save of the
same state. The second save is the one that matters: the first one also allocates the reusable
host staging buffers (page faults), later ones only copy into them.

Variants, each in a fresh process (``common.run_worker``), each doing ``--saves`` saves:

* ``ckptio-sync``   ``CheckpointManager(...).save()``: blocked = the whole durable save.
* ``ckptio-async``  ``CheckpointManager(async_save=True).save()``: blocked = staging copy; the write
  runs in the background and ``wait()`` (timed separately) stands in for the training between saves.
* ``dcp-async``     ``torch.distributed.checkpoint.async_save`` with the default ``FileSystemWriter``
  (gloo process group of one rank): blocked = until the returned future exists.

Run: ``.venv/bin/python benchmarks/bench_async.py [--scale 0.7] [--saves 4] [--thp]``.
Writes ``benchmarks/results/async.md`` and ``async.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TARGET = 0.30
VARIANTS = ("ckptio-sync", "ckptio-async", "dcp-async")


def _worker(task: dict[str, Any]) -> None:
    import torch

    state = common.make_state_dict(task["scale"])
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = Path(task["work_dir"]) / task["variant"]
    common.remove(work)
    work.mkdir(parents=True)
    blocked: list[float] = []
    finish: list[float] = []
    variant = task["variant"]
    if variant.startswith("ckptio"):
        import ckptio

        mgr = ckptio.CheckpointManager(
            str(work), async_save=variant == "ckptio-async", retention=ckptio.KeepLatest(1)
        )
        for step in range(task["saves"]):
            t0 = time.perf_counter()
            mgr.save(step, state)
            t1 = time.perf_counter()
            mgr.wait()  # the training between two saves; the write overlaps it
            t2 = time.perf_counter()
            blocked.append(t1 - t0)
            finish.append(t2 - t1)
            for t in state.values():  # training changes the weights
                t.view(-1)[:1].add_(1) if t.is_floating_point() else None
        extra: dict[str, Any] = {}
        if variant == "ckptio-async":
            bufs = mgr._stagers[0]._buffers
            extra["staging_buffers"] = len(bufs)
        mgr.close()
    else:
        import warnings

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        warnings.simplefilter("ignore")
        store = tempfile.mkdtemp()
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        extra = {}
        for step in range(task["saves"]):
            t0 = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=str(work / f"step_{step}"))
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            blocked.append(t1 - t0)
            finish.append(t2 - t1)
            common.remove(work / f"step_{step - 1}")
        dist.destroy_process_group()
    common.remove(work)
    common.emit_result(
        {
            "variant": variant,
            "bytes": nbytes,
            "blocked_s": blocked,
            "background_s": finish,
            "thp_env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "torch_threads": torch.get_num_threads(),
            **extra,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.7, help="state size: 1.0 = 2.19 GB (default 0.7)")
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--thp", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 in the workers")
    ap.add_argument("--work-dir", default=str(common.DEFAULT_WORK_DIR))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    facts = common.machine_facts(Path(args.work_dir))
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        task = {"variant": variant, "scale": args.scale, "saves": args.saves, "work_dir": args.work_dir}
        res = common.run_worker(Path(__file__), task, timeout=900)
        results[variant] = res
        if not res.get("ok"):
            print(f"{variant}: FAILED {res.get('error')}")
            continue
        print(
            f"{variant}: blocked {[f'{x:.3f}' for x in res['blocked_s']]} s, "
            f"background {[f'{x:.3f}' for x in res['background_s']]} s"
        )

    def later_median(variant: str) -> float | None:
        res = results.get(variant, {})
        if not res.get("ok"):
            return None
        vals = res["blocked_s"][1:] or res["blocked_s"]
        return statistics.median(vals)

    sync = later_median("ckptio-sync")
    asyn = later_median("ckptio-async")
    dcp_b = later_median("dcp-async")
    ratio = asyn / sync if (asyn is not None and sync) else None
    verdict = "PASS" if ratio is not None and ratio <= TARGET else "FAIL"
    gb = next((r["bytes"] for r in results.values() if r.get("ok")), 0) / common.GB
    rows = []
    for variant in VARIANTS:
        res = results[variant]
        if not res.get("ok"):
            rows.append([variant, "failed", "", "", ""])
            continue
        first = res["blocked_s"][0]
        med = later_median(variant)
        bg = statistics.median(res["background_s"][1:] or res["background_s"])
        rows.append(
            [
                variant,
                common.fmt(first, 3),
                common.fmt(med, 3),
                common.fmt(bg, 3),
                common.fmt(med / sync, 3) if (med is not None and sync) else "—",
            ]
        )
    table = common.markdown_table(
        [
            "variant",
            "blocked, 1st save (s)",
            "blocked, later saves, median (s)",
            "background after return, median (s)",
            "blocked / ckptio sync save",
        ],
        rows,
    )
    summary = (
        f"ckptio async blocked {common.fmt(asyn, 3)} s vs sync save {common.fmt(sync, 3)} s: "
        f"ratio {common.fmt(ratio, 3)} (target <= {TARGET}) -> {verdict}"
    )
    if dcp_b is not None and asyn is not None:
        summary += (
            f"; dcp.async_save blocked {common.fmt(dcp_b, 3)} s ({common.fmt(dcp_b / asyn, 1)}x ckptio's)"
        )
    md = "\n".join(
        [
            "# Async save: time blocked in save()",
            "",
            f"State: {gb:.2f} GB LLM-shaped (scale {args.scale}), {args.saves} saves per variant, each variant in a "
            f"fresh process; local disk ({facts.get('work_fs')}), durable (fsync). THP_MEM_ALLOC_ENABLE="
            f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; THP: {facts.get('thp')}; "
            f"load average at start {facts.get('loadavg_start')}.",
            "",
            table,
            "",
            f"**{summary}**",
            "",
            '"blocked" is the time the training thread spends inside the save call. For ckptio-async it is the copy '
            'into the reused host staging buffers; "background" is the rest of the durable write, overlapped with '
            "training (here: measured by `wait()`). The first save of ckptio-async also allocates the staging buffers; "
            "dcp.async_save allocates a fresh staging copy on every save (its buffer cache pins memory, which fails "
            "on CPU-only builds).",
            "",
        ]
    )
    common.write_results(
        "async",
        md,
        {
            "facts": facts,
            "target": TARGET,
            "ratio": ratio,
            "verdict": verdict,
            "scale": args.scale,
            "results": results,
        },
    )
    print(summary)


if __name__ == "__main__":
    main()
