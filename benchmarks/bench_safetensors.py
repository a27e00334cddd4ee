"""safetensors format: ckptio vs torch's HF storage writer/reader, safetensors save_file/load_file, and
torch's safetensors consolidation.

Run ``python benchmarks/bench_safetensors.py [--scale 0.45] [--reps 2] [--only ROW,ROW]``. Writes
``benchmarks/results/safetensors.md`` and ``safetensors.json``. Every measurement runs in a fresh
subprocess (peak RSS per measurement; see ``common.py`` for the conventions). Saves are timed until
durable (an fsync of every output file and directory is included for everyone); loads read a warm page
cache into existing (pre-touched) tensors. The consolidation input is a real 2-rank save (DTensor
``Shard(0)`` on every tensor, gloo, CPU) in ckptio's safetensors format, whose headers also carry torch's
``DCP_SHARDING_INFO``, so both consolidators read the very same files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C

SCRIPT = Path(__file__).resolve()
DEFAULT_SCALE = 0.45  # about 1 GB

SAVE_ROWS = {
    "ckptio_save": ("ckptio.save safetensors+file://", "st/ckptio"),
    "torch_hf_save": ("DCP HuggingFaceStorageWriter", "st/torch_hf"),
    "save_file": ("safetensors save_file", "st/save_file/model.safetensors"),
    "write_floor": ("reference: write the same bytes + fsync (dd conv=fdatasync)", "st/floor/blob"),
}
LOAD_ROWS = {
    "ckptio_load": ("ckptio.load (in place)", "ckptio_save"),
    "torch_hf_load": ("DCP HuggingFaceStorageReader (in place)", "torch_hf_save"),
    "load_file": ("safetensors load_file + copy_", "save_file"),
}
CONS_ROWS = {
    "ckptio_consolidate": ("ckptio_safetensors.consolidate", "st/cons_ckptio"),
    "torch_consolidate": ("torch consolidate_safetensors_files", "st/cons_torch"),
    "cons_floor": ("reference: write the same bytes + fsync (dd conv=fdatasync)", "st/cons_floor/blob"),
}
SHARDED = "st/sharded_2ranks"


# -- workers (fresh process each) ---------------------------------------------------------------
def _worker_save(task: dict[str, Any]) -> dict[str, Any]:
    row, scale = task["row"], task["scale"]
    import ckptio
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    target = Path(task["work"]) / SAVE_ROWS[row][1]
    C.remove(target)
    if row == "write_floor":
        return _write_floor(target, C.spec_nbytes(C.llm_spec(scale)))
    target.parent.mkdir(parents=True, exist_ok=True)
    sd = C.make_state_dict(scale)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    os.sync()
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        if row == "ckptio_save":
            ckptio.save(sd, f"safetensors+file://{target}")
        elif row == "torch_hf_save":
            dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(target)), no_dist=True)
        else:
            save_file(sd, str(target))
        t1 = time.perf_counter()
        C.fsync_tree(target)
        t2 = time.perf_counter()
    nfiles, _ = C.tree_size(target)
    return {
        "call_s": t1 - t0,
        "time_s": t2 - t0,
        "bytes": nbytes,
        "files": nfiles,
        "extra_rss_mb": mem.extra_mb,
        "loadavg": C.loadavg(),
    }


def _write_floor(target: Path, nbytes: int) -> dict[str, Any]:
    """What the storage itself costs: ``nbytes`` from a pre-touched 64 MiB buffer, written with plain
    ``write`` and one ``fsync``, as ``dd conv=fdatasync`` does. A writer that overlaps writeback with
    copying (ckptio's local backend) gets somewhat below it, nobody gets far below it: a peer's
    time over this floor bounds the speed-up any writer of the same bytes can show on this storage."""
    target.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(1 << 20)) * 64
    os.sync()
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(memoryview(block)[: min(left, len(block))])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    return {
        "call_s": elapsed,
        "time_s": elapsed,
        "bytes": nbytes,
        "files": 1,
        "extra_rss_mb": 0.0,
        "loadavg": C.loadavg(),
    }


def _worker_load(task: dict[str, Any]) -> dict[str, Any]:
    row, scale = task["row"], task["scale"]
    import ckptio
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    src = Path(task["work"]) / SAVE_ROWS[LOAD_ROWS[row][1]][1]
    if not src.exists():
        return {"ok": False, "error": f"no checkpoint at {src}"}
    dest = C.make_state_dict(scale, zeros=True)
    nbytes = sum(t.numel() * t.element_size() for t in dest.values())
    C.read_all(src)  # warm
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        if row == "ckptio_load":
            ckptio.load(dest, str(src))
        elif row == "torch_hf_load":
            dcp.load(dest, storage_reader=HuggingFaceStorageReader(str(src)), no_dist=True)
        else:
            C.copy_into(dest, load_file(str(src)))
        t1 = time.perf_counter()
    ok, why = C.verify_state_dict(dest, scale)
    return {
        "time_s": t1 - t0,
        "bytes": nbytes,
        "extra_rss_mb": mem.extra_mb,
        "correct": ok,
        "check": why,
        "loadavg": C.loadavg(),
    }


def _rank_save(rank: int, world: int, port: int, scale: float, target: str) -> None:
    import ckptio
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state: dict[str, Any] = {}
        for name, full in C.make_state_dict(scale).items():
            per = math.ceil(full.shape[0] / world)
            local = full[rank * per : min(full.shape[0], (rank + 1) * per)].clone()
            state[name] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            del full
        torch.distributed.barrier()
        ckptio.save(state, f"safetensors+file://{target}")
    finally:
        dist.destroy_process_group()


def _worker_shard(task: dict[str, Any]) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    target = Path(task["work"]) / SHARDED
    C.remove(target)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.start_processes(_rank_save, args=(2, port, task["scale"], str(target)), nprocs=2, start_method="spawn")
    nfiles, size = C.tree_size(target)
    return {"time_s": time.perf_counter() - t0, "files": nfiles, "bytes": size}


def _worker_consolidate(task: dict[str, Any]) -> dict[str, Any]:
    row, scale = task["row"], task["scale"]
    from ckptio_safetensors import consolidate  # resolved (imported) before timing, like torch's below
    from safetensors import safe_open
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    src = Path(task["work"]) / SHARDED
    out = Path(task["work"]) / CONS_ROWS[row][1]
    C.remove(out)
    if row == "cons_floor":  # the floor again, in the consolidation rounds
        return _write_floor(out, C.spec_nbytes(C.llm_spec(scale)))
    C.read_all(src)  # both read from a warm page cache
    names = [n for n, _, _ in C.llm_spec(scale)]
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        if row == "ckptio_consolidate":
            consolidate(str(src), str(out), workers=task.get("workers", 2), progress=False)
        else:
            out.mkdir(parents=True)
            consolidate_safetensors_files(str(src), str(out), fqn_to_index_mapping=dict.fromkeys(names, 1))
        t1 = time.perf_counter()
        C.fsync_tree(out)
        t2 = time.perf_counter()
    files = sorted(out.glob("*.safetensors"))
    merged: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            merged.update({k: h.get_tensor(k) for k in h.keys()})
    ok, why = C.verify_state_dict(merged, scale)
    nbytes = sum(t.numel() * t.element_size() for t in merged.values())
    return {
        "call_s": t1 - t0,
        "time_s": t2 - t0,
        "bytes": nbytes,
        "files": len(files),
        "extra_rss_mb": mem.extra_mb,
        "correct": ok,
        "check": why,
        "loadavg": C.loadavg(),
    }


def worker_main(task: dict[str, Any]) -> int:
    warnings.filterwarnings("ignore")
    fn = {
        "save": _worker_save,
        "load": _worker_load,
        "shard": _worker_shard,
        "consolidate": _worker_consolidate,
    }
    try:
        res = fn[task["kind"]](task)
        res.setdefault("ok", True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        import traceback

        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    C.emit_result(res)
    return 0


# -- parent -------------------------------------------------------------------------------------
def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if s.get("ok")]
    if not good:
        return {"n": 0, "error": (samples[0].get("error", "?") if samples else "not run")}
    times = [s["time_s"] for s in good]
    rates = [s["bytes"] / s["time_s"] / C.GB for s in good]
    res: dict[str, Any] = {
        "n": len(good),
        "s_best": min(times),
        "s_med": statistics.median(times),
        "gbps_best": max(rates),
        "gbps_med": statistics.median(rates),
        "extra_rss_mb": max(s.get("extra_rss_mb", 0.0) for s in good),
    }
    if "call_s" in good[0]:
        res["call_s_med"] = statistics.median(s["call_s"] for s in good)
    if "correct" in good[0]:
        res["correct"] = all(s["correct"] for s in good)
    if "files" in good[0]:
        res["files"] = good[0]["files"]
    res["loadavg_med"] = statistics.median(s.get("loadavg") or 0.0 for s in good)
    return res


def _ratio(summ: dict[str, Any], a: str, b: str, key: str = "s_med") -> float | None:
    x, y = summ.get(a), summ.get(b)
    if not x or not y or not x.get("n") or not y.get("n"):
        return None
    return y[key] / x[key]  # speed ratio from times


def _storages(work: Path, wanted: str) -> dict[str, Path]:
    """``disk``: the work dir (durable saves pay the disk); ``tmpfs``: ``/dev/shm``, where the
    same fsyncs cost nothing and the rows measure the software alone (skipped if absent or small)."""
    out: dict[str, Path] = {}
    for name in [w for w in wanted.split(",") if w]:
        if name == "disk":
            out[name] = work
        elif name == "tmpfs":
            shm = Path("/dev/shm")
            if shm.is_dir() and shutil.disk_usage(shm).free > 8 * C.GB:
                out[name] = shm / f"ckptio-bench-{os.getpid()}"
        else:
            raise SystemExit(f"unknown storage {name!r} (disk, tmpfs)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get(C.SCALE_ENV) or DEFAULT_SCALE),
        help=f"state-dict scale (1.0 = 2.19 GB; default {DEFAULT_SCALE} = about 1 GB)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="ckptio consolidation threads")
    ap.add_argument("--work", default=str(C.DEFAULT_WORK_DIR))
    ap.add_argument("--storage", default="disk,tmpfs", help="where to write: disk, tmpfs (default both)")
    ap.add_argument("--only", default="", help="comma-separated row ids (results are printed, not written)")
    args = ap.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    only = {r for r in args.only.split(",") if r}
    facts = C.machine_facts(work)
    nbytes = C.spec_nbytes(C.llm_spec(args.scale))
    storages = _storages(work, args.storage)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    summ: dict[str, Any] = {}
    raw: dict[str, Any] = {}

    def rounds(
        kind: str, rows: list[str], where: Path, key: str, extra: dict[str, Any] | None = None
    ) -> None:
        """``reps`` rounds over ``rows``, order rotated each round, so that drift (a shared disk,
        other jobs) lands on every row alike; ratios then compare medians."""
        samples: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
        for r in range(args.reps if rows else 0):
            for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
                task = {"kind": kind, "row": row, "scale": args.scale, "work": str(where), **(extra or {})}
                os.sync()
                time.sleep(1.0)  # let writeback and the previous worker's memory (torch's: 2 GB) settle
                res = C.run_worker(SCRIPT, task, timeout=900)
                samples[row].append(res)
                if res.get("ok"):
                    log(
                        f"{row}@{key} rep {r + 1}: {res['time_s']:.2f}s, "
                        f"{res['bytes'] / res['time_s'] / C.GB:.2f} GB/s, extra RSS {res.get('extra_rss_mb', 0):.0f} MB"
                    )
                else:
                    log(f"{row}@{key} rep {r + 1}: FAILED {res.get('error')}")
        for row in rows:
            raw[f"{row}@{key}"] = samples[row]
            summ[f"{row}@{key}"] = summarize(samples[row])

    def pick(group: dict[str, Any]) -> list[str]:
        return [row for row in group if not only or row in only]

    for key, where in storages.items():
        where.mkdir(parents=True, exist_ok=True)
        try:
            rounds("save", pick(SAVE_ROWS), where, key)
            if key == "disk":  # loads read a warm page cache: the storage does not matter
                rounds("load", pick(LOAD_ROWS), where, key)
            if pick(CONS_ROWS):
                shard = C.run_worker(
                    SCRIPT, {"kind": "shard", "scale": args.scale, "work": str(where)}, timeout=900
                )
                log(f"2-rank sharded input on {key}: {shard}")
                raw[f"sharded_input@{key}"] = shard
                rounds("consolidate", pick(CONS_ROWS), where, key, {"workers": args.workers})
        finally:
            if where != work:
                shutil.rmtree(where, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    facts["loadavg_end"] = C.loadavg()

    ck_mb = nbytes / 1e6
    targets = []

    def target(name: str, value: float | None, ok: bool | None, want: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        targets.append({"target": name, "value": value, "want": want, "verdict": verdict})

    for key in storages:
        r = _ratio(summ, f"ckptio_save@{key}", f"torch_hf_save@{key}")
        target(f"[{key}] save throughput vs torch HF writer", r, None if r is None else r >= 2.5, ">= 2.5x")
        r = _ratio(summ, f"ckptio_save@{key}", f"save_file@{key}")
        target(
            f"[{key}] save throughput vs safetensors save_file", r, None if r is None else r >= 0.9, ">= 0.9x"
        )
        s = summ.get(f"ckptio_save@{key}") or {}
        pct = 100 * s["extra_rss_mb"] / ck_mb if s.get("n") else None
        target(
            f"[{key}] save peak extra RSS, % of checkpoint", pct, None if pct is None else pct <= 10, "<= 10%"
        )
        r = _ratio(summ, f"ckptio_consolidate@{key}", f"torch_consolidate@{key}")
        target(f"[{key}] consolidation speed vs torch (durable)", r, None if r is None else r >= 2.0, ">= 2x")
        r2 = _ratio(summ, f"ckptio_consolidate@{key}", f"torch_consolidate@{key}", "call_s_med")
        target(f"[{key}] consolidation speed vs torch (call, before fsync)", r2, None, "info")
        for row, ref, what in (
            ("torch_hf_save", "write_floor", "torch HF writer"),
            ("torch_consolidate", "cons_floor", "torch consolidation"),
        ):
            floor = (summ.get(f"{ref}@{key}") or {}).get("s_med")
            peer = (summ.get(f"{row}@{key}") or {}).get("s_med")
            if floor and peer:
                target(
                    f"[{key}] {what} time / dd-style floor time (what a plain write+fsync leaves to gain)",
                    peer / floor,
                    None,
                    "info",
                )
        a, b = summ.get(f"ckptio_consolidate@{key}") or {}, summ.get(f"torch_consolidate@{key}") or {}
        if a.get("n") and b.get("n"):
            target(
                f"[{key}] consolidation peak extra RSS vs torch (MB)",
                a["extra_rss_mb"],
                a["extra_rss_mb"] < b["extra_rss_mb"],
                f"< {b['extra_rss_mb']:.0f} MB",
            )

    rows = []
    for key in storages:
        for row, (label, _) in {**SAVE_ROWS, **LOAD_ROWS, **CONS_ROWS}.items():
            s = summ.get(f"{row}@{key}")
            if s is None:
                continue
            if not s.get("n"):
                rows.append([label, key, "0", "—", "—", "—", "—", s.get("error", "")[:100]])
                continue
            notes = []
            if "correct" in s:
                notes.append("correct" if s["correct"] else "**WRONG DATA**")
            if "files" in s:
                notes.append(f"{s['files']} files")
            notes.append(f"loadavg {s['loadavg_med']:.1f}")
            rows.append(
                [
                    label,
                    key,
                    str(s["n"]),
                    f"{C.fmt(s['s_best'])}/{C.fmt(s['s_med'])}",
                    f"{C.fmt(s['gbps_best'])}/{C.fmt(s['gbps_med'])}",
                    C.fmt(s.get("call_s_med")),
                    f"{s['extra_rss_mb']:.0f}",
                    ", ".join(notes),
                ]
            )
    lines = [
        f"# safetensors format ({facts['date']})\n",
        f"Machine: {facts.get('cpus')} CPUs ({facts.get('cpu_model', '?')}), {facts.get('ram_gib')} GiB RAM, work dir on "
        f"{facts.get('work_fs')}. torch {facts.get('torch')}, safetensors {facts.get('safetensors')}.\n",
        f"State: {len(C.llm_spec(args.scale))} tensors, {nbytes / C.GB:.3f} GB (scale {args.scale}); {args.reps} rounds, "
        f"each running every row of a group once in a fresh process, the order rotated each round; medians compare. "
        f"Storage: *disk* is the work dir, *tmpfs* is /dev/shm (fsync is free there, so those rows time the software "
        f"alone; on disk the *reference* row is the floor: the same bytes written and fsynced with nothing else to do). Saves: until durable "
        f"(fsync of every file for everyone). Loads: warm page cache, into existing tensors. Consolidation: same "
        f"2-rank sharded input for both, output fsynced, ckptio with {args.workers} workers. Load average at start "
        f"{C.fmt(facts.get('loadavg_start'))}, end {C.fmt(facts.get('loadavg_end'))} (other jobs share this machine: "
        f"treat differences under ~30% as noise). Runtime {elapsed:.0f}s.\n",
        C.markdown_table(
            [
                "method",
                "storage",
                "n",
                "s best/med",
                "GB/s best/med",
                "call s med",
                "peak extra RSS MB",
                "notes",
            ],
            rows,
        ),
        "\n## Targets\n",
        C.markdown_table(
            ["target", "measured", "want", "verdict"],
            [[t["target"], C.fmt(t["value"]), t["want"], t["verdict"]] for t in targets],
        ),
        "",
    ]
    md = "\n".join(lines)
    if not only:
        C.write_results(
            "safetensors",
            md,
            {
                "facts": facts,
                "scale": args.scale,
                "bytes": nbytes,
                "storages": {k: str(v) for k, v in storages.items()},
                "summary": summ,
                "targets": targets,
                "raw": raw,
            },
        )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
