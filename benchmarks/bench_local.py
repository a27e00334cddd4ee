"""Local-disk throughput: ckptio vs torch.save/torch.load, safetensors and DCP FileSystemWriter/Reader.

Run ``python benchmarks/bench_local.py [--scale 0.05] [--reps 3] [--only ROW,ROW]``. Writes
``benchmarks/results/local.md`` and ``local.json``. See ``benchmarks/README.md`` for how to read the numbers.

* ``--baseline DIR`` adds a ``[baseline]`` row for every ckptio row, run with ckptio (and its plugins) imported
  from ``DIR``, a copy of ``core/src/ckptio`` and the plugins' packages taken before a change, in the same
  rounds as this tree's rows: a before/after under the same background load.
* ckptio finds its plugins (entry points) and imports the file backend on first use. Like the other rows'
  imports, that happens before the timed region; its time is reported as ``plugin discovery`` (untimed).
* ``dd`` also reads the ckptio checkpoint's own data files after a cache drop (``ref:dd_ckptio_cold``): the
  disk's speed on exactly the files a cold ckptio load reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C

SCRIPT = Path(__file__).resolve()

# Row ids -> (label, checkpoint path relative to the work dir). Load rows name the save row whose output they read.
SAVE_ROWS: dict[str, tuple[str, str]] = {
    "torch_save": ("torch.save + fsync", "torch/model.pt"),
    "safetensors_save": ("safetensors save_file + fsync", "safetensors/model.safetensors"),
    "dcp_fs_save": ("DCP FileSystemWriter (defaults)", "dcp_fs"),
    "ckptio_save": ("ckptio.save", "ckptio/ckpt"),
}
LOAD_ROWS: dict[str, tuple[str, str]] = {
    "torch_load": ("torch.load(weights_only=True) + copy_", "torch_save"),
    "safetensors_load": ("safetensors load_file + copy_", "safetensors_save"),
    "dcp_fs_load": ("DCP FileSystemReader (in place)", "dcp_fs_save"),
    "ckptio_load": ("ckptio.load (in place)", "ckptio_save"),
    "ckptio_load_noverify": ("ckptio.load(verify=False)", "ckptio_save"),
}
CKPTIO_ROWS = {"ckptio_save", "ckptio_load", "ckptio_load_noverify"}
PEERS_SAVE = {"torch": "torch_save", "safetensors": "safetensors_save", "DCP": "dcp_fs_save"}
PEERS_LOAD = {"torch": "torch_load", "safetensors": "safetensors_load", "DCP": "dcp_fs_load"}


BASE = "@base"  # suffix of the rows that run ckptio from --baseline DIR (before/after in one run)


def add_baseline_rows() -> None:
    """Rows ``<ckptio row>@base``: the same methods with ckptio imported from ``--baseline``'s copy."""
    SAVE_ROWS["ckptio_save" + BASE] = ("ckptio.save [baseline]", "ckptio_base/ckpt")
    LOAD_ROWS["ckptio_load" + BASE] = ("ckptio.load (in place) [baseline]", "ckptio_save")
    LOAD_ROWS["ckptio_load_noverify" + BASE] = ("ckptio.load(verify=False) [baseline]", "ckptio_save")
    CKPTIO_ROWS.update(r + BASE for r in ("ckptio_save", "ckptio_load", "ckptio_load_noverify"))


class Skip(Exception):
    """The row cannot run here (e.g. ckptio is not importable yet)."""


def _import_ckptio() -> Any:
    try:
        import ckptio
    except ImportError as e:
        raise Skip(f"ckptio not importable: {e}") from e
    for fn in ("save", "load"):
        if not callable(getattr(ckptio, fn, None)):
            raise Skip(f"ckptio.{fn} not available yet")
    return ckptio


def _load_plugins() -> float | None:
    """ckptio finds its plugins (entry points) and imports the file backend on first use: its
    import cost, paid once per process. Done here, outside the timed region, as the other rows'
    imports are; returns the seconds it took (reported as ``plugins_s``)."""
    try:
        from ckptio.plugins import backend_factory, get_format
    except ImportError:
        return None
    t0 = time.perf_counter()
    backend_factory("file")
    get_format("native")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh subprocess per repetition)
# ---------------------------------------------------------------------------------------------------------------


def _do_save(row: str, sd: dict[str, Any], target: Path) -> None:
    import torch

    row = row.removesuffix(BASE)
    if row == "torch_save":
        with open(target, "wb") as f:
            torch.save(sd, f)
    elif row == "safetensors_save":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    elif row == "dcp_fs_save":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        dcp.save(sd, storage_writer=FileSystemWriter(str(target)))
    elif row == "ckptio_save":
        _import_ckptio().save(sd, str(target))
    else:
        raise ValueError(row)


def _worker_save(task: dict[str, Any]) -> dict[str, Any]:
    row, scale = task["row"], task["scale"]
    plugins_s = None
    if row in CKPTIO_ROWS:
        _import_ckptio()
        plugins_s = _load_plugins()
    if row == "dcp_fs_save":
        import torch.distributed.checkpoint  # noqa: F401  (import cost outside the timed region)
    if row == "safetensors_save":
        import safetensors.torch  # noqa: F401
    target = Path(task["work"]) / SAVE_ROWS[row][1]
    C.remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sd = C.make_state_dict(scale)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    os.sync()  # no dirty pages of earlier runs in the timed region
    load0 = C.loadavg()
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        _do_save(row, sd, target)
        t1 = time.perf_counter()
        C.fsync_tree(target)  # durable for everyone: fsync all files + dirs (near-free when already synced)
        t2 = time.perf_counter()
    nfiles, disk_bytes = C.tree_size(target)
    return {
        "call_s": t1 - t0,
        "time_s": t2 - t0,
        "bytes": nbytes,
        "files": nfiles,
        "disk_bytes": disk_bytes,
        "extra_rss_mb": mem.extra_mb,
        "rss_reset": mem.reset_ok,
        "loadavg": load0,
        "plugins_s": plugins_s,
    }


def _worker_load(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    row, scale, mode = task["row"], task["scale"], task["mode"]
    ckptio = _import_ckptio() if row in CKPTIO_ROWS else None
    plugins_s = _load_plugins() if ckptio is not None else None
    src = Path(task["work"]) / SAVE_ROWS[LOAD_ROWS[row][1]][1]
    if not src.exists():
        raise Skip(f"no checkpoint at {src} (its save row failed?)")
    if row == "dcp_fs_load":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
    if row == "safetensors_load":
        from safetensors.torch import load_file

    row = row.removesuffix(BASE)
    dest = C.make_state_dict(scale, zeros=True)  # existing, pre-touched tensors (like a live model)
    ptrs = {k: t.data_ptr() for k, t in dest.items()}
    nbytes = sum(t.numel() * t.element_size() for t in dest.values())
    cold = None
    if mode == "cold":
        # Every row starts from the same state: its files read once (so the host, which caches
        # this VM's disk, holds them as it does for whichever row read them last), then dropped
        # from this machine's page cache. Without it, the first row to read a set of files after
        # other rows' files paid for the host's cache and the next one did not (ckptio's verified
        # load measured 0.56x dd, then 1.0x when run alone).
        C.read_all(src)
        cold = C.drop_caches()
    else:
        C.read_all(src)  # prime the page cache
    load0 = C.loadavg()
    touch_s = copy_s = 0.0
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        if row == "torch_load":
            out = torch.load(src, weights_only=True)
        elif row == "safetensors_load":
            out = load_file(str(src))
        elif row == "dcp_fs_load":
            dcp.load(dest, storage_reader=FileSystemReader(str(src)))
            out = None
        elif row == "ckptio_load":
            ckptio.load(dest, str(src))
            out = None
        elif row == "ckptio_load_noverify":
            ckptio.load(dest, str(src), verify=False)
            out = None
        else:
            raise ValueError(row)
        t1 = time.perf_counter()
        if (
            out is not None
        ):  # returned new (possibly mmap-backed) tensors: +touch, then copy into the existing ones
            C.touch(out.values())
            t2 = time.perf_counter()
            C.copy_into(dest, out)
            t3 = time.perf_counter()
            touch_s, copy_s = t2 - t1, t3 - t2
        t_end = time.perf_counter()
    correct, why = C.verify_state_dict(dest, scale)
    in_place = all(dest[k].data_ptr() == p for k, p in ptrs.items())
    return {
        "call_s": t1 - t0,
        "touch_s": touch_s,
        "copy_s": copy_s,
        "time_s": t_end - t0,
        "bytes": nbytes,
        "extra_rss_mb": mem.extra_mb,
        "rss_reset": mem.reset_ok,
        "cold": cold,
        "correct": correct,
        "check": why,
        "in_place": in_place,
        "loadavg": load0,
        "plugins_s": plugins_s,
    }


def _worker_memcpy(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    nbytes = C.spec_nbytes(C.llm_spec(task["scale"]))
    src = torch.empty(nbytes, dtype=torch.uint8)
    C._fill(src, 0)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # pre-touched
    t0 = time.perf_counter()
    dst.copy_(src)
    t1 = time.perf_counter()
    del dst
    t2 = time.perf_counter()
    c = src.clone()  # fresh allocation: pays first-touch page faults
    t3 = time.perf_counter()
    del c
    return {"time_s": t1 - t0, "clone_s": t3 - t2, "bytes": nbytes}


def _worker_preadv(task: dict[str, Any]) -> dict[str, Any]:
    """The floor of any reader that copies out of the page cache: the ckptio checkpoint's files,
    cached, read with ``os.preadv`` in 1 MiB pieces into pre-touched memory on as many threads as
    ckptio's default (one per usable core), with no planning and no Python per tensor; once
    without a checksum, then with each piece hashed (xxh3-64, as ckptio verifies) as it lands."""
    import threading

    import torch
    import xxhash

    src = Path(task["work"]) / SAVE_ROWS["ckptio_save"][1]
    files = [p for p in C.iter_files(src) if p.stat().st_size]
    if not files:
        raise Skip(f"no checkpoint at {src}")
    piece = 1 * C.MiB
    jobs, total = [], 0
    for p in files:
        size = p.stat().st_size
        jobs += [(p, off, min(piece, size - off), total + off) for off in range(0, size, piece)]
        total += size
    dst = torch.zeros(total, dtype=torch.uint8)  # pre-touched, like the tensors of a live model
    view = memoryview(dst.numpy())
    C.read_all(src)  # warm
    fds = {p: os.open(p, os.O_RDONLY) for p in files}
    n_threads = max(1, len(os.sched_getaffinity(0)))

    def timed(hashing: bool) -> float:
        lock, todo = threading.Lock(), iter(jobs)

        def work() -> None:
            while True:
                with lock:
                    job = next(todo, None)
                if job is None:
                    return
                p, off, n, at = job
                os.preadv(fds[p], [view[at : at + n]], off)
                if hashing:
                    xxhash.xxh3_64_hexdigest(view[at : at + n])

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    try:
        plain, hashed = timed(False), timed(True)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"time_s": plain, "hashed_s": hashed, "bytes": total, "threads": n_threads}


def worker_main(task: dict[str, Any]) -> int:
    warnings.filterwarnings("ignore")
    import torch

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    if task.get("row", "").endswith(BASE):  # ckptio (and its plugins) from the --baseline copy
        sys.path.insert(0, task["baseline"])
        add_baseline_rows()
    try:
        kinds = {
            "save": _worker_save,
            "load": _worker_load,
            "memcpy": _worker_memcpy,
            "preadv": _worker_preadv,
        }
        fn = kinds[task["kind"]]
        res = fn(task)
        res["ok"] = True
        res["torch_threads"] = torch.get_num_threads()
    except Skip as e:
        res = {"ok": False, "skipped": True, "error": str(e)}
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        import traceback

        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    C.emit_result(res)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def _dd(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - t0


def run_dd(work: Path, nbytes: int, reps: int, log: Any) -> dict[str, dict[str, Any]]:
    bs = 16 * C.MiB
    count = max(1, math.ceil(nbytes / bs))
    ddbytes = count * bs
    f = work / "dd" / "dd.bin"
    f.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {
        k: {"samples": []} for k in ("dd_write", "dd_read_cold", "dd_read_warm")
    }
    cold_ok = True
    try:
        for r in range(reps):
            C.remove(f)
            os.sync()
            t = _dd(["if=/dev/zero", f"of={f}", "bs=16M", f"count={count}", "conv=fdatasync"])
            out["dd_write"]["samples"].append({"time_s": t, "bytes": ddbytes, "ok": True})
            cold_ok = C.drop_caches() and cold_ok
            t = _dd([f"if={f}", "of=/dev/null", "bs=16M"])
            out["dd_read_cold"]["samples"].append(
                {"time_s": t, "bytes": ddbytes, "ok": True, "cold": cold_ok}
            )
            _dd([f"if={f}", "of=/dev/null", "bs=16M"])
            t = _dd([f"if={f}", "of=/dev/null", "bs=16M"])
            out["dd_read_warm"]["samples"].append({"time_s": t, "bytes": ddbytes, "ok": True})
            rates = [ddbytes / out[k]["samples"][-1]["time_s"] / C.GB for k in out]
            log(
                f"dd rep {r + 1}: write {rates[0]:.2f}, cold read {rates[1]:.2f}, warm read {rates[2]:.2f} GB/s"
            )
    except (OSError, subprocess.CalledProcessError) as e:
        for v in out.values():
            v["error"] = f"dd failed: {e}"
    finally:
        C.remove(f)
    return out


def dd_files_cold(src: Path) -> dict[str, Any]:
    """``dd bs=16M`` of every data file of the checkpoint at ``src``, one after the other, after a
    cache drop: the disk's speed on the very files a cold load reads."""
    files = [p for p in C.iter_files(src) if p.suffix == ".bin"]
    nbytes = sum(p.stat().st_size for p in files)
    C.read_all(src)  # the state every cold load row starts from (see _worker_load)
    cold = C.drop_caches()
    load0 = C.loadavg()
    t0 = time.perf_counter()
    for p in files:
        _dd([f"if={p}", "of=/dev/null", "bs=16M"])
    return {"ok": True, "time_s": time.perf_counter() - t0, "bytes": nbytes, "cold": cold, "loadavg": load0}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if s.get("ok")]
    if not good:
        errs = [s.get("error", "?") for s in samples]
        return {
            "n": 0,
            "error": errs[0] if errs else "not run",
            "skipped": any(s.get("skipped") for s in samples),
        }
    times = [s["time_s"] for s in good]
    rates = [s["bytes"] / s["time_s"] / C.GB for s in good]
    res: dict[str, Any] = {
        "n": len(good),
        "s_best": min(times),
        "s_med": statistics.median(times),
        "gbps_best": max(rates),
        "gbps_med": statistics.median(rates),
    }
    if len(good) < len(samples):
        res["failed_reps"] = len(samples) - len(good)
    if "call_s" in good[0]:
        calls = [s["call_s"] for s in good]
        res["call_s_best"], res["call_s_med"] = min(calls), statistics.median(calls)
    if "touch_s" in good[0] and any(s["touch_s"] or s["copy_s"] for s in good):
        tt = [s["call_s"] + s["touch_s"] for s in good]
        res["touch_gbps_best"] = max(s["bytes"] / t / C.GB for s, t in zip(good, tt))
        res["touch_gbps_med"] = statistics.median(s["bytes"] / t / C.GB for s, t in zip(good, tt))
    if "extra_rss_mb" in good[0]:
        res["extra_rss_mb_max"] = max(s["extra_rss_mb"] for s in good)
        res["extra_rss_mb_first"] = good[0]["extra_rss_mb"]
    if "correct" in good[0]:
        res["correct"] = all(s["correct"] for s in good)
        res["in_place"] = all(s["in_place"] for s in good)
    if "cold" in good[0] and good[0]["cold"] is not None:
        res["cold"] = all(s["cold"] for s in good)
    if "files" in good[0]:
        res["files"] = good[0]["files"]
    loads = [s["loadavg"] for s in good if s.get("loadavg") is not None]
    if loads:
        res["loadavg_med"] = statistics.median(loads)
    plugins = [s["plugins_s"] for s in good if s.get("plugins_s") is not None]
    if plugins:
        res["plugins_s_med"] = statistics.median(plugins)
    return res


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not a.get("n") or not b.get("n"):
        return None
    return a["gbps_med"] / b["gbps_med"]


def build_report(
    facts: dict[str, Any], summ: dict[str, dict[str, Any]], args: argparse.Namespace, elapsed: float
) -> tuple[str, list[str], dict[str, Any]]:
    ref = {
        "save": summ.get("ref:dd_write"),
        "cold": summ.get("ref:dd_read_cold"),
        "warm": summ.get("ref:memcpy"),
    }
    ref_name = {"save": "dd fdatasync", "cold": "dd cold read", "warm": "memcpy"}
    cold_note = ""
    if any(s.get("cold") is False for k, s in summ.items() if k.endswith(":cold")):
        cold_note = " (NOT cold: drop_caches not permitted)"

    lines: list[str] = []
    lines.append(f"# Local checkpoint throughput ({facts['date']})\n")
    lines.append(
        f"Machine: {facts.get('cpus')} CPUs ({facts.get('cpu_model', '?')}), {facts.get('ram_gib')} GiB RAM, "
        f"kernel {facts.get('kernel')}, work dir on {facts.get('work_fs')}, THP `{facts.get('thp', '?')}`. "
        f"Python {facts.get('python')}, torch {facts.get('torch')}, safetensors {facts.get('safetensors')}, "
        f"ckptio {facts.get('ckptio')}.\n"
    )
    loads = [s["loadavg_med"] for s in summ.values() if s.get("loadavg_med") is not None]
    cpus = facts.get("cpus") or 1
    if loads and statistics.median(loads) > cpus:
        lines.append(
            f"> **WARNING: heavy background load** (median 1-min load average {statistics.median(loads):.1f} on "
            f"{cpus} CPUs during the timed regions). Absolute numbers are far below this machine's quiet-time "
            "limits, and ratios are noisy. Re-run on a quiet machine before drawing conclusions.\n"
        )
    lines.append(
        f"State dict: {facts['tensors']} tensors, {facts['bytes'] / C.GB:.3f} GB (scale {args.scale}); "
        f"{args.reps} repetitions per row, each in a fresh process; torch threads: {facts.get('torch_threads')}; "
        f"GB = 1e9 bytes. Total runtime {elapsed:.0f} s. "
        f"Load average (1 min) at start {C.fmt(facts.get('loadavg_start'))}, at end {C.fmt(facts.get('loadavg_end'))} "
        f"on {facts.get('cpus')} CPUs.\n"
    )

    # --- main table
    headers = [
        "method",
        "op",
        "n",
        "s best/med",
        "GB/s best/med",
        "× torch",
        "× safetensors",
        "× DCP",
        "× limit",
        "peak extra RSS MB",
        "notes",
    ]
    rows: list[list[str]] = []

    def add(key: str, label: str, op: str, peers: dict[str, str], opkey: str, suffix: str) -> None:
        s = summ.get(key)
        if s is None:
            return
        if not s.get("n"):
            rows.append([label, op, "0", "—", "—", "—", "—", "—", "—", "—", s.get("error", "")[:120]])
            return
        ratios = []
        for peer in ("torch", "safetensors", "DCP"):
            pk = peers[peer] + suffix
            ratios.append("—" if pk == key else C.fmt(_ratio(s, summ.get(pk))))
        notes = []
        if "correct" in s and not s["correct"]:
            notes.append("**WRONG DATA**")
        if s.get("in_place") is False and key.startswith("ckptio"):
            notes.append("not in place")
        if "files" in s:
            notes.append(f"{s['files']} files")
        if s.get("failed_reps"):
            notes.append(f"{s['failed_reps']} reps failed")
        if s.get("loadavg_med") is not None:
            notes.append(f"loadavg {s['loadavg_med']:.1f}")
        if s.get("plugins_s_med") is not None:
            notes.append(f"plugin discovery {s['plugins_s_med']:.2f} s untimed")
        rows.append(
            [
                label,
                op,
                str(s["n"]),
                f"{C.fmt(s['s_best'])}/{C.fmt(s['s_med'])}",
                f"{C.fmt(s['gbps_best'])}/{C.fmt(s['gbps_med'])}",
                *ratios,
                f"{C.fmt(_ratio(s, ref[opkey]))} ({ref_name[opkey]})",
                C.fmt(s.get("extra_rss_mb_max"), 0),
                ", ".join(notes),
            ]
        )

    for row, (label, _) in SAVE_ROWS.items():
        add(row, label, "save (durable)", PEERS_SAVE, "save", "")
    for mode in ("cold", "warm"):
        for row, (label, _) in LOAD_ROWS.items():
            op = f"load {mode}" + (cold_note if mode == "cold" else "")
            add(f"{row}:{mode}", label, op, PEERS_LOAD, mode, f":{mode}")

    lines.append("## Results (ratios use medians; × limit = vs dd fdatasync / dd cold read / memcpy)\n")
    lines.append(C.markdown_table(headers, rows) + "\n")

    # --- details: call time vs total, +touch
    dh = [
        "method",
        "op",
        "call s best/med",
        "total s best/med",
        "+touch GB/s best/med",
        "extra RSS MB run 1/max",
    ]
    drows = []
    for key, s in summ.items():
        if key.startswith("ref:") or not s.get("n"):
            continue
        row = key.split(":")[0]
        label = (SAVE_ROWS.get(row) or LOAD_ROWS.get(row) or (row,))[0]
        op = "save" if row in SAVE_ROWS else f"load {key.split(':')[1]}"
        touch = (
            f"{C.fmt(s['touch_gbps_best'])}/{C.fmt(s['touch_gbps_med'])}"
            if "touch_gbps_med" in s
            else "(in place)"
        )
        drows.append(
            [
                label,
                op,
                f"{C.fmt(s.get('call_s_best'))}/{C.fmt(s.get('call_s_med'))}",
                f"{C.fmt(s['s_best'])}/{C.fmt(s['s_med'])}",
                touch,
                f"{C.fmt(s.get('extra_rss_mb_first'), 0)}/{C.fmt(s.get('extra_rss_mb_max'), 0)}",
            ]
        )
    lines.append("## Details: call vs. total time\n")
    lines.append(
        "Save: *call* = the API returns, *total* = + fsync of every file and directory (durable). Load: *call* = the "
        "API returns; *+touch* = call + reading 1 byte per 4 KiB of the returned tensors (mmap results are not free); "
        "*total* = data is in the existing pre-touched tensors (for torch.load/safetensors: call + touch + `copy_`).\n"
    )
    lines.append(C.markdown_table(dh, drows) + "\n")

    # --- references
    rh = ["reference", "GB/s best/med", "s best/med", "n"]
    rrows = []
    ref_labels = {
        "ref:dd_write": "`dd bs=16M conv=fdatasync` (durable write)",
        "ref:dd_read_cold": "`dd bs=16M` read after drop_caches (cold)" + cold_note,
        "ref:dd_ckptio_cold": "`dd bs=16M` of the ckptio checkpoint's data files, after drop_caches (cold)"
        + cold_note,
        "ref:dd_read_warm": "`dd bs=16M` read from page cache (warm)",
        "ref:memcpy": "memcpy `dst.copy_(src)` into pre-touched buffer",
        "ref:clone": "`src.clone()` (fresh allocation, first-touch faults; info)",
        "ref:preadv_warm": "`os.preadv` of the ckptio checkpoint's files (warm) into pre-touched memory, 1 MiB "
        "pieces, one thread per core, no checksum: the floor of a reader that copies from the page cache",
        "ref:preadv_hashed_warm": "the same, each piece hashed (xxh3-64) as it lands: the floor of a reader "
        "that copies from the page cache and verifies",
    }
    for key, label in ref_labels.items():
        s = summ.get(key)
        if s is None:
            continue
        if not s.get("n"):
            rrows.append([label, "—", "—", f"0 ({s.get('error', '')[:80]})"])
            continue
        rrows.append(
            [
                label,
                f"{C.fmt(s['gbps_best'])}/{C.fmt(s['gbps_med'])}",
                f"{C.fmt(s['s_best'])}/{C.fmt(s['s_med'])}",
                str(s["n"]),
            ]
        )
    lines.append("## Limits of this machine (same byte count)\n")
    lines.append(C.markdown_table(rh, rrows) + "\n")

    # --- targets
    targets: list[str] = []
    target_data: dict[str, Any] = {}

    def target(name: str, key: str, other: str, other_label: str, need: float, info: bool = False) -> None:
        s, o = summ.get(key), summ.get(other)
        tag = "INFO" if info else None
        if not s or not s.get("n"):
            why = (s or {}).get("error", "not run")
            verdict = "SKIP"
            line = f"{tag or verdict}: {name} >= {need}x {other_label} -- not measured ({why[:100]})"
        elif not o or not o.get("n"):
            verdict = "SKIP"
            line = f"{tag or verdict}: {name} >= {need}x {other_label} -- reference missing"
        else:
            r = s["gbps_med"] / o["gbps_med"]
            rb = s["gbps_best"] / o["gbps_best"]
            verdict = "PASS" if r >= need else "FAIL"
            line = (
                f"{tag + ' ' + verdict if tag else verdict}: {name} >= {need}x {other_label}: "
                f"{r:.2f}x median ({s['gbps_med']:.2f} vs {o['gbps_med']:.2f} GB/s), {rb:.2f}x best"
            )
        targets.append(line)
        target_data[f"{key} vs {other}"] = {"need": need, "verdict": verdict, "info": info, "line": line}

    target("ckptio durable save", "ckptio_save", "dcp_fs_save", "DCP FileSystemWriter", 1.2)
    target("ckptio durable save", "ckptio_save", "ref:dd_write", "dd fdatasync", 0.9)
    target("ckptio cold load", "ckptio_load:cold", "dcp_fs_load:cold", "DCP FileSystemReader", 3.0)
    target("ckptio warm load into existing tensors", "ckptio_load:warm", "ref:memcpy", "memcpy", 0.7)
    target(
        "ckptio cold load",
        "ckptio_load:cold",
        "ref:dd_ckptio_cold",
        "dd of the same files",
        1.0,
        info=True,
    )
    if "ckptio_load" + BASE in LOAD_ROWS:
        for mode in ("cold", "warm"):
            target(
                f"ckptio {mode} load (this tree)",
                f"ckptio_load:{mode}",
                f"ckptio_load{BASE}:{mode}",
                "the baseline",
                1.0,
                info=True,
            )
        target("ckptio save (this tree)", "ckptio_save", "ckptio_save" + BASE, "the baseline", 1.0, info=True)
    target(
        "ckptio cold load verify=False",
        "ckptio_load_noverify:cold",
        "dcp_fs_load:cold",
        "DCP FileSystemReader",
        3.0,
        info=True,
    )
    target(
        "ckptio warm load verify=False", "ckptio_load_noverify:warm", "ref:memcpy", "memcpy", 0.7, info=True
    )
    target("preadv floor (no checksum)", "ref:preadv_warm", "ref:memcpy", "memcpy", 0.7, info=True)
    target("preadv+xxh3 floor", "ref:preadv_hashed_warm", "ref:memcpy", "memcpy", 0.7, info=True)
    target(
        "ckptio warm load",
        "ckptio_load:warm",
        "ref:preadv_hashed_warm",
        "the preadv+xxh3 floor",
        0.9,
        info=True,
    )
    lines.append("## Targets (medians)\n")
    lines.append("```\n" + "\n".join(targets) + "\n```\n")

    lines.append("## Noise\n")
    lines.append(
        "This is a shared 2-CPU VM; other jobs may run during the benchmark. The `loadavg` note per row is the median "
        "1-minute load average at the start of its timed regions; above ~1 expect noise. Treat differences under ~30% "
        "as noise. The virtual disk is cached by the host, so 'cold' is guest-cold only: every cold row (and `dd` of the "
        "ckptio files) first reads its files once, then drops this machine's page cache, so that all start host-warm "
        "alike.\n"
    )
    if facts.get("top_processes_start"):
        lines.append(
            "Top processes at start (pcpu rss comm): " + "; ".join(facts["top_processes_start"]) + "\n"
        )
    if facts.get("top_processes_end"):
        lines.append("Top processes at end: " + "; ".join(facts["top_processes_end"]) + "\n")
    return "\n".join(lines), targets, target_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scale", type=float, default=C.default_scale(), help="state dict size factor (1.0 = 2.19 GB)"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions per row (each a fresh process)")
    p.add_argument(
        "--only", default="", help="comma-separated row ids (e.g. dd,memcpy,torch_save,ckptio_load)"
    )
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK_DIR, help="scratch dir (git-ignored)")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("CKPTIO_BENCH_THREADS", "0")),
        help="torch.set_num_threads in every worker (0 = torch default). With background load on few cores, "
        "OpenMP barriers can make small copies 10x slower; 1 avoids that",
    )
    p.add_argument("--keep", action="store_true", help="keep the checkpoint files in the work dir")
    p.add_argument(
        "--no-write", action="store_true", help="print only, do not write benchmarks/results/local.*"
    )
    p.add_argument("--from-json", type=Path, help="re-render the report from a local.json of an earlier run")
    p.add_argument(
        "--baseline",
        type=Path,
        help="also run every ckptio row with ckptio imported from this directory (a copy of core/src and the "
        "plugins' src, e.g. before a change), as '[baseline]' rows, in the same rounds",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.from_json:  # re-render the report of an earlier run
        data = json.loads(args.from_json.read_text())
        args.scale, args.reps = data["args"]["scale"], data["args"]["reps"]
        if data["args"].get("baseline"):
            add_baseline_rows()
        md, _, _ = build_report(data["facts"], data["summary"], args, data["elapsed_s"])
        print(md)
        if not args.no_write:
            C.write_results("local", md, data)
        return 0

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if args.baseline:
        args.baseline = args.baseline.resolve()
        add_baseline_rows()

    def want(row: str) -> bool:
        return not only or row.removesuffix(BASE) in only

    t_start = time.perf_counter()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    facts = C.machine_facts(args.work)
    spec = C.llm_spec(args.scale)
    nbytes = C.spec_nbytes(spec)
    facts["tensors"], facts["bytes"] = len(spec), nbytes
    log(
        f"state dict: {len(spec)} tensors, {nbytes / C.GB:.3f} GB (scale {args.scale}); "
        f"loadavg {C.fmt(facts['loadavg_start'])}; ckptio: {facts['ckptio']}"
    )

    raw: dict[str, list[dict[str, Any]]] = {}
    task_base = {
        "scale": args.scale,
        "work": str(args.work),
        "threads": args.threads,
        "baseline": str(args.baseline or ""),
    }

    # 1. references
    if want("dd"):
        log("dd references")
        for k, v in run_dd(args.work, nbytes, args.reps, log).items():
            raw[f"ref:{k}"] = v["samples"] or [{"ok": False, "error": v.get("error", "?")}]
    if want("memcpy"):
        raw["ref:memcpy"], raw["ref:clone"] = [], []
        for _ in range(args.reps):
            r = C.run_worker(SCRIPT, {**task_base, "kind": "memcpy"})
            raw["ref:memcpy"].append(r)
            raw["ref:clone"].append({**r, "time_s": r.get("clone_s")} if r.get("ok") else r)
        log(
            f"memcpy: {[round(r['bytes'] / r['time_s'] / C.GB, 2) for r in raw['ref:memcpy'] if r.get('ok')]} GB/s"
        )

    # 2. saves (round-robin over rows, so slow drifts in background load hit every row alike)
    save_rows = [r for r in SAVE_ROWS if want(r)]
    for rep in range(args.reps):
        for row in save_rows:
            if rep and raw[row] and raw[row][-1].get("skipped"):
                continue
            r = C.run_worker(SCRIPT, {**task_base, "kind": "save", "row": row, "rep": rep})
            raw.setdefault(row, []).append(r)
            msg = (
                f"{r['time_s']:.2f} s durable ({r['bytes'] / r['time_s'] / C.GB:.2f} GB/s), call {r['call_s']:.2f} s"
                if r.get("ok")
                else f"{'SKIP' if r.get('skipped') else 'FAIL'}: {r.get('error')}"
            )
            log(f"save rep {rep + 1} {row}: {msg}")

    # 3. loads: make sure each needed checkpoint exists (untimed), then cold and warm round-robin
    load_rows = [r for r in LOAD_ROWS if want(r)]
    for src_row in dict.fromkeys(LOAD_ROWS[r][1] for r in load_rows):
        if not (args.work / SAVE_ROWS[src_row][1]).exists():
            r = C.run_worker(SCRIPT, {**task_base, "kind": "save", "row": src_row, "rep": -1})
            log(f"prepared {src_row} checkpoint: {'ok' if r.get('ok') else r.get('error')}")
    ckptio_ckpt = args.work / SAVE_ROWS["ckptio_save"][1]
    for rep in range(args.reps):
        if want("dd") and ckptio_ckpt.exists():
            r = dd_files_cold(ckptio_ckpt)
            raw.setdefault("ref:dd_ckptio_cold", []).append(r)
            log(f"dd of the ckptio files, cold: {r['bytes'] / r['time_s'] / C.GB:.2f} GB/s")
        if want("memcpy") and ckptio_ckpt.exists():
            r = C.run_worker(SCRIPT, {**task_base, "kind": "preadv"})
            raw.setdefault("ref:preadv_warm", []).append(r)
            raw.setdefault("ref:preadv_hashed_warm", []).append(
                {**r, "time_s": r.get("hashed_s")} if r.get("ok") else r
            )
            if r.get("ok"):
                log(
                    f"preadv floor, warm: {r['bytes'] / r['time_s'] / C.GB:.2f} GB/s, "
                    f"hashed {r['bytes'] / r['hashed_s'] / C.GB:.2f} GB/s"
                )
        for mode in ("cold", "warm"):
            for row in load_rows:
                key = f"{row}:{mode}"
                if rep and raw[key] and raw[key][-1].get("skipped"):
                    continue
                r = C.run_worker(SCRIPT, {**task_base, "kind": "load", "row": row, "mode": mode, "rep": rep})
                raw.setdefault(key, []).append(r)
                msg = (
                    f"{r['time_s']:.2f} s ({r['bytes'] / r['time_s'] / C.GB:.2f} GB/s), call {r['call_s']:.2f} s, "
                    f"correct={r['correct']}"
                    if r.get("ok")
                    else f"{'SKIP' if r.get('skipped') else 'FAIL'}: {r.get('error')}"
                )
                log(f"load rep {rep + 1} {key}: {msg}")

    if not args.keep:
        for row in SAVE_ROWS.values():
            C.remove(args.work / row[1].split("/")[0])
        C.remove(args.work / "dd")

    elapsed = time.perf_counter() - t_start
    facts["loadavg_end"] = C.loadavg()
    facts["top_processes_end"] = C.top_processes()
    summ = {k: summarize(v) for k, v in raw.items()}
    threads = sorted({s["torch_threads"] for v in raw.values() for s in v if "torch_threads" in s})
    facts["torch_threads"] = ",".join(map(str, threads)) + (" (--threads)" if args.threads else " (default)")
    md, targets, target_data = build_report(facts, summ, args, elapsed)
    print()
    print(md)
    if not args.no_write:
        data = {
            "facts": facts,
            "args": {
                "scale": args.scale,
                "reps": args.reps,
                "only": sorted(only),
                "baseline": str(args.baseline or ""),
            },
            "elapsed_s": elapsed,
            "summary": summ,
            "targets": target_data,
            "raw": raw,
        }
        mdp, jsp = C.write_results("local", md, data)
        print(f"wrote {mdp.relative_to(C.REPO_ROOT)} and {jsp.relative_to(C.REPO_ROOT)}")
    # Peer rows must work; ckptio rows may be skipped until ckptio is importable.
    hard_fail = [
        k
        for k, s in summ.items()
        if not s.get("n") and not s.get("skipped") and k.split(":")[0] not in CKPTIO_ROWS
    ]
    if hard_fail:
        print(f"FAILED rows: {', '.join(hard_fail)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
