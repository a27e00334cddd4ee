"""Many ranks on one machine: ckptio vs DCP FileSystemWriter/Reader at 1, 2, 4, 8 and 16 ranks.

A fixed total state (``$CKPTIO_BENCH_RANKS_BYTES``, default 512 MB; ``--bytes``) is split across the ranks:
16 layers of two bf16 ``[R, 2048]`` matrices sharded on dim 0 (DTensor ``Shard(0)`` over a 1-D CPU mesh, as
FSDP2 shards them) and one replicated fp32 norm each. Every rank saves and loads its own shards. The ranks are
started like ``torchrun --nproc-per-node N`` does (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR/PORT``, and ``OMP_NUM_THREADS=1`` when N > 1) and join a gloo process group.

Per rank count, one launch of N processes runs an untimed warm-up round of every method, then ``--reps``
timed rounds in an order that rotates each round. Each timed region is ``barrier; op; barrier`` on every rank,
so it is the time until the last rank is done:

* ``dcp_save``    ``dcp.save(sd, storage_writer=FileSystemWriter(p))`` (defaults: one file per rank, fsync)
* ``ckptio_save`` ``ckptio.save(sd, p)`` (durable, atomic, checksummed)
* ``dcp_load``    ``dcp.load(sd, storage_reader=FileSystemReader(p))`` into the existing DTensors
* ``ckptio_load`` ``ckptio.load(sd, p)`` into the existing DTensors (checksums verified)

Loads run warm (the files were just written) and, where ``/proc/sys/vm/drop_caches`` is writable, cold (rank 0
drops the page cache before the first barrier). The previous checkpoint is removed before each save, untimed.
Every load is checked bit-exact on a sample of every shard.

Run ``python benchmarks/bench_ranks.py [--ranks 1,2,4,8,16] [--bytes 512e6] [--reps 3] [--modes warm,cold]``.
Writes ``benchmarks/results/ranks.md`` and ``ranks.json`` (``--no-write``: print only). ``--baseline DIR`` also
runs every rank count with ckptio imported from ``DIR`` (a copy of ``core/src/ckptio`` and the plugins' packages
taken before a change), in a launch of its own next to this tree's, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C

SCRIPT = Path(__file__).resolve()
BYTES_ENV = "CKPTIO_BENCH_RANKS_BYTES"
RANKS_ENV = "CKPTIO_BENCH_RANKS"
LAYERS = 16
COLS = 2048
BASE = "@base"  # summary keys of the --baseline launches


def _rows(total_bytes: float, max_ranks: int) -> int:
    """Rows R of each ``[R, COLS]`` bf16 matrix so the 2 * LAYERS matrices hold ``total_bytes``; R is a
    multiple of ``max_ranks`` so every rank count divides it."""
    rows = int(total_bytes) // (2 * LAYERS * COLS * 2)
    return max(max_ranks, rows - rows % max_ranks)


# ---------------------------------------------------------------------------------------------------------------
# Worker (one per rank)
# ---------------------------------------------------------------------------------------------------------------


def _fill(t: Any, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    b = t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1)
    n = b.numel()
    block = torch.randint(0, 256, (min(n, 1 << 20),), dtype=torch.uint8, generator=g)
    for off in range(0, n, block.numel()):
        k = min(block.numel(), n - off)
        b[off : off + k].copy_(block[:k])


def _make_state(rows: int, mesh: Any, rank: int, world: int, zeros: bool) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local_rows = rows // world
    sd: dict[str, Any] = {}
    for i in range(LAYERS):
        for j, name in enumerate(("mlp.up", "mlp.down")):
            local = torch.zeros(local_rows, COLS, dtype=torch.bfloat16)
            if not zeros:
                _fill(local, 1000 * (2 * i + j) + rank)
            sd[f"layers.{i}.{name}.weight"] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, COLS)), stride=(COLS, 1)
            )
        norm = torch.zeros(COLS, dtype=torch.float32)
        if not zeros:
            _fill(norm, 7 + i)  # same seed on every rank: replicated
        sd[f"layers.{i}.norm.weight"] = DTensor.from_local(norm, mesh, [Replicate()], run_check=False)
    return sd


def _check(dest: dict[str, Any], src: dict[str, Any], sample: int = 64 << 10) -> bool:
    import torch

    for k, d in dest.items():
        a = d.to_local().reshape(-1).view(torch.uint8)
        b = src[k].to_local().reshape(-1).view(torch.uint8)
        if not (torch.equal(a[:sample], b[:sample]) and torch.equal(a[-4096:], b[-4096:])):
            return False
    return True


def _zero(sd: dict[str, Any]) -> None:
    for t in sd.values():
        t.to_local().zero_()


def worker_main(task: dict[str, Any]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import ckptio
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (world,))
        rows = int(task["rows"])
        src = _make_state(rows, mesh, rank, world, zeros=False)
        dest = _make_state(rows, mesh, rank, world, zeros=True)
        work = Path(task["work"])
        paths = {"dcp": work / "dcp", "ckptio": work / "ckptio"}
        modes = list(task["modes"])

        def run(method: str) -> None:
            if method == "dcp_save":
                dcp.save(src, storage_writer=FileSystemWriter(str(paths["dcp"])))
            elif method == "ckptio_save":
                ckptio.save(src, str(paths["ckptio"]))
            elif method == "dcp_load":
                dcp.load(dest, storage_reader=FileSystemReader(str(paths["dcp"])))
            elif method == "ckptio_load":
                ckptio.load(dest, str(paths["ckptio"]))

        def timed(method: str, mode: str) -> dict[str, Any]:
            if method.endswith("_save"):
                if rank == 0:
                    C.remove(paths[method.split("_")[0]])
                    os.sync()
            else:
                _zero(dest)
                if rank == 0:
                    if mode == "cold":
                        cold_ok = C.drop_caches()
                    else:
                        C.read_all(paths[method.split("_")[0]])
            dist.barrier()
            load0 = C.loadavg()
            t0 = time.perf_counter()
            run(method)
            dist.barrier()
            t1 = time.perf_counter()
            res: dict[str, Any] = {"time_s": t1 - t0, "loadavg": load0}
            if method.endswith("_load"):
                ok = torch.tensor([int(_check(dest, src))])
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                res["correct"] = bool(ok.item())
                if mode == "cold" and rank == 0:
                    res["cold"] = cold_ok
            return res

        jobs = [("dcp_save", "-"), ("ckptio_save", "-")]
        jobs += [(m, mode) for mode in modes for m in ("dcp_load", "ckptio_load")]
        results: dict[str, list[dict[str, Any]]] = {}
        warmup: dict[str, float] = {}
        for method, mode in jobs:  # warm-up round: imports, first-call costs (untimed in the summary)
            warmup[f"{method}:{mode}"] = timed(method, mode)["time_s"]
        for rep in range(int(task["reps"])):
            # rotate saves among themselves and loads among themselves (a load reads the last save)
            k = rep % 2
            saves = jobs[:2][k:] + jobs[:2][:k]
            loads = jobs[2:]
            loads = [j for pair in zip(loads[0::2], loads[1::2]) for j in (pair[k:] + pair[:k])]
            for method, mode in saves + loads:
                results.setdefault(f"{method}:{mode}", []).append(timed(method, mode))
        if rank == 0:
            C.emit_result({"ok": True, "results": results, "warmup": warmup})
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(n: int, task: dict[str, Any], timeout: float, pythonpath: str = "") -> dict[str, Any]:
    """Start ``n`` ranks like torchrun does; return rank 0's result (``ok=False`` on failure/timeout).
    ``pythonpath`` goes first on the ranks' ``PYTHONPATH`` (``--baseline``)."""
    port = _free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        env.update(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if n > 1:
            env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--worker", json.dumps(task)],
                env=env,
                cwd=C.REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    outs: list[tuple[str, str]] = []
    try:
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            try:
                outs.append(p.communicate(timeout=left))
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"timeout after {timeout:.0f}s"}
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
    for line in reversed(outs[0][0].splitlines()):
        if line.startswith(C.RESULT_PREFIX):
            return json.loads(line[len(C.RESULT_PREFIX) :])
    bad = next((o for p, o in zip(procs, outs) if p.returncode), outs[0])
    tail = (bad[1] or bad[0]).strip().splitlines()[-8:]
    return {"ok": False, "error": " / ".join(tail)}


def summarize(samples: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    times = [s["time_s"] for s in samples]
    out: dict[str, Any] = {
        "n": len(times),
        "s_best": min(times),
        "s_med": statistics.median(times),
        "gbps_med": nbytes / statistics.median(times) / C.GB,
    }
    if any("correct" in s for s in samples):
        out["correct"] = all(s.get("correct", False) for s in samples)
    if any("cold" in s for s in samples):
        out["cold"] = all(s.get("cold", False) for s in samples)
    loads = [s["loadavg"] for s in samples if s.get("loadavg") is not None]
    if loads:
        out["loadavg_med"] = statistics.median(loads)
    return out


def _ops(modes: list[str]) -> list[tuple[str, str]]:
    return [("save (durable)", "save:-")] + [(f"load {m}", f"load:{m}") for m in modes]


def _vs_dcp(
    summ: dict[str, Any], args: dict[str, Any], tag: str
) -> tuple[list[list[str]], dict[str, list[tuple[int, float]]]]:
    """Table rows of ckptio vs DCP for the launches keyed ``f"{n}{tag}"``, and the ratios per op."""
    rows: list[list[str]] = []
    ratios: dict[str, list[tuple[int, float]]] = {}
    for n in args["ranks"]:
        res = summ.get(f"{n}{tag}")
        if res is None:
            continue
        if "error" in res:
            rows.append([str(n), "—", "—", "—", "—", "—", "—", f"FAILED: {res['error'][:150]}"])
            continue
        for op, suffix in _ops(args["modes"]):
            d, c = res.get(f"dcp_{suffix}"), res.get(f"ckptio_{suffix}")
            if not d or not c:
                continue
            ratio = d["s_med"] / c["s_med"]
            ratios.setdefault(op, []).append((n, ratio))
            notes = []
            for who, s in (("DCP", d), ("ckptio", c)):
                if s.get("correct") is False:
                    notes.append(f"**{who} WRONG DATA**")
                if s.get("cold") is False:
                    notes.append("NOT cold (drop_caches not permitted)")
            loads = [s["loadavg_med"] for s in (d, c) if "loadavg_med" in s]
            rows.append(
                [
                    str(n),
                    op,
                    C.fmt(d["s_med"]),
                    C.fmt(c["s_med"]),
                    C.fmt(c["gbps_med"]),
                    f"**{ratio:.2f}**" if ratio < 1.0 else f"{ratio:.2f}",
                    C.fmt(statistics.median(loads), 1) if loads else "—",
                    ", ".join(dict.fromkeys(notes)),
                ]
            )
    return rows, ratios


def build_report(data: dict[str, Any]) -> str:
    facts, args, summ = data["facts"], data["args"], data["summary"]
    baseline = args.get("baseline")
    lines = [f"# Many ranks on one machine ({facts['date']})\n"]
    lines.append(
        f"Machine: {facts.get('cpus')} CPUs ({facts.get('cpu_model', '?')}), {facts.get('ram_gib')} GiB RAM, work dir "
        f"on {facts.get('work_fs')}. torch {facts.get('torch')}, ckptio {facts.get('ckptio')}. "
        f"State: {data['bytes'] / C.GB:.3f} GB in total ({LAYERS * 3} DTensors: {2 * LAYERS} bf16 "
        f"`[{data['rows']}, {COLS}]` sharded on dim 0 over the ranks, {LAYERS} fp32 norms replicated), split across "
        f"the ranks; gloo; ranks started like torchrun (`OMP_NUM_THREADS=1` when N > 1). {args['reps']} timed rounds "
        f"per rank count after one warm-up round, order rotating; times are `barrier; op; barrier` (the slowest rank); "
        f"medians. GB = 1e9 bytes. Total runtime {data['elapsed_s']:.0f} s; load average (1 min) at start "
        f"{C.fmt(facts.get('loadavg_start'))}, at end {C.fmt(facts.get('loadavg_end'))} on {facts.get('cpus')} CPUs.\n"
    )
    headers = ["ranks", "op", "DCP s (med)", "ckptio s (med)", "ckptio GB/s", "× DCP", "loadavg", "notes"]
    rows, ratios = _vs_dcp(summ, args, "")
    lines.append("## ckptio vs DCP (× DCP = DCP time / ckptio time; above 1 is ckptio faster)\n")
    lines.append(C.markdown_table(headers, rows) + "\n")
    lines.append("## Target: ckptio >= 1.0x DCP at every rank count\n")
    verdicts = []
    for op, rs in ratios.items():
        low = min(r for _, r in rs)
        verdicts.append(
            f"{'PASS' if low >= 1.0 else 'FAIL'}: {op}: lowest {low:.2f}x; "
            + ", ".join(f"{n} ranks {r:.2f}x" for n, r in rs)
        )
    lines.append("```\n" + "\n".join(verdicts) + "\n```\n")
    if baseline:
        brows, _ = _vs_dcp(summ, args, BASE)
        lines.append(
            f"## Baseline: ckptio imported from `{baseline}`, vs DCP in the same launches\n\n"
            "Each rank count ran twice, this tree and the baseline, one launch after the other (alternating "
            "which goes first). Compare the × DCP columns: DCP is the yardstick measured alongside each.\n"
        )
        lines.append(C.markdown_table(headers, brows) + "\n")
        crows = []
        for n in args["ranks"]:
            a, b = summ.get(str(n)) or {}, summ.get(f"{n}{BASE}") or {}
            for op, suffix in _ops(args["modes"]):
                ca, cb = a.get(f"ckptio_{suffix}"), b.get(f"ckptio_{suffix}")
                da, db = a.get(f"dcp_{suffix}"), b.get(f"dcp_{suffix}")
                if not (ca and cb and da and db):
                    continue
                crows.append(
                    [
                        str(n),
                        op,
                        C.fmt(cb["s_med"]),
                        C.fmt(ca["s_med"]),
                        C.fmt(cb["s_med"] / ca["s_med"]),
                        C.fmt(db["s_med"] / cb["s_med"]),
                        C.fmt(da["s_med"] / ca["s_med"]),
                    ]
                )
        lines.append("### This tree vs the baseline\n")
        lines.append(
            C.markdown_table(
                [
                    "ranks",
                    "op",
                    "baseline s",
                    "this tree s",
                    "speed-up",
                    "baseline × DCP",
                    "this tree × DCP",
                ],
                crows,
            )
            + "\n"
        )
    wrows = []
    wkeys: list[str] = []
    for n in args["ranks"]:
        w = (summ.get(str(n)) or {}).get("warmup")
        if w:
            wkeys = sorted(w)
            wrows.append([str(n)] + [C.fmt(w.get(k)) for k in wkeys])
    if wrows:
        lines.append(
            "## First round (warm-up, untimed in the tables above; s)\n\nIncludes each process's first-call "
            "costs: ckptio's plugin discovery, DCP's first planning.\n"
        )
        lines.append(C.markdown_table(["ranks", *wkeys], wrows) + "\n")
    lines.append(
        "## Noise\n\nOn a shared 2-CPU VM every rank count above 2 oversubscribes the CPUs; background jobs add to "
        "that. The loadavg column is the median 1-minute load average at the start of the timed regions of the two "
        "rows compared. Treat differences under about 30% as noise.\n"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default=os.environ.get(RANKS_ENV, "1,2,4,8,16"), help="rank counts")
    p.add_argument(
        "--bytes",
        type=float,
        default=float(os.environ.get(BYTES_ENV, "0") or 0) or 512e6 * C.default_scale(),
        help=f"total state bytes across all ranks (default ${BYTES_ENV}, else 512e6 x $CKPTIO_BENCH_SCALE)",
    )
    p.add_argument("--reps", type=int, default=3, help="timed rounds per rank count")
    p.add_argument("--modes", default="warm,cold", help="load modes: warm and/or cold")
    p.add_argument(
        "--work", type=Path, default=C.DEFAULT_WORK_DIR / "ranks", help="scratch dir (git-ignored)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per rank count")
    p.add_argument(
        "--no-write", action="store_true", help="print only, do not write benchmarks/results/ranks.*"
    )
    p.add_argument("--from-json", type=Path, help="re-render the report from a ranks.json")
    p.add_argument(
        "--baseline",
        type=Path,
        help="also run every rank count with ckptio imported from this directory (a copy of core/src and the "
        "plugins' src, e.g. before a change), in its own launch right before or after this tree's",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.from_json:
        print(build_report(json.loads(args.from_json.read_text())))
        return 0

    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    modes = [m for m in args.modes.split(",") if m.strip() in ("warm", "cold")]
    t_start = time.perf_counter()
    work = args.work.resolve()
    facts = C.machine_facts(work.parent if not work.exists() else work)
    rows = _rows(args.bytes, max(ranks))
    nbytes = 2 * LAYERS * rows * COLS * 2 + LAYERS * COLS * 4

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    log(f"state {nbytes / C.GB:.3f} GB, ranks {ranks}, modes {modes}, loadavg {C.fmt(C.loadavg())}")
    summary: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    failed = False
    baseline = str(args.baseline.resolve()) if args.baseline else ""
    for i, n in enumerate(ranks):
        tags = ["", BASE] if baseline else [""]
        for tag in tags if i % 2 == 0 else tags[::-1]:
            C.remove(work)
            work.mkdir(parents=True)
            task = {"rows": rows, "work": str(work), "reps": args.reps, "modes": modes}
            res = launch(n, task, args.timeout, pythonpath=baseline if tag else "")
            key = f"{n}{tag}"
            raw[key] = res
            if not res.get("ok"):
                failed = True
                summary[key] = {"error": res.get("error", "?")}
                log(f"{n} ranks{tag}: FAILED {res.get('error')}")
                continue
            summary[key] = {k: summarize(v, nbytes) for k, v in res["results"].items()}
            summary[key]["warmup"] = res["warmup"]
            parts = []
            for suffix in ["save:-"] + [f"load:{m}" for m in modes]:
                d, c = summary[key][f"dcp_{suffix}"], summary[key][f"ckptio_{suffix}"]
                parts.append(
                    f"{suffix} dcp {d['s_med']:.2f}s ckptio {c['s_med']:.2f}s ({d['s_med'] / c['s_med']:.2f}x)"
                )
            log(f"{n} ranks{tag}: " + "; ".join(parts) + f"; loadavg {C.fmt(C.loadavg())}")
    C.remove(work)
    facts["loadavg_end"] = C.loadavg()
    data = {
        "facts": facts,
        "args": {"ranks": ranks, "reps": args.reps, "modes": modes, "baseline": baseline},
        "bytes": nbytes,
        "rows": rows,
        "elapsed_s": time.perf_counter() - t_start,
        "summary": summary,
        "raw": raw,
    }
    md = build_report(data)
    print()
    print(md)
    if not args.no_write:
        mdp, jsp = C.write_results("ranks", md, data)
        print(f"wrote {mdp.relative_to(C.REPO_ROOT)} and {jsp.relative_to(C.REPO_ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
