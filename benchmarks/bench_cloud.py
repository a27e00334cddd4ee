"""Cloud save/load benchmark on a local S3 server (moto): ckptio vs DCP fsspec, MSC and boto3.

    python benchmarks/bench_cloud.py [--mib 128] [--reps 3] [--only ckptio-s3,msc-dcp]

Every measurement runs in a fresh subprocess (``common.run_worker``) so that peak extra RSS is the
method's own. Rows, all on the same bytes (``--mib`` of fp32 tensors, <= 256 MiB: moto keeps
everything in one Python process and slows down, and grows, with larger objects):

* ``ckptio s3://``: ckptio's native format through ckptio-fsspec (parallel multipart/ranged GETs).
* ``ckptio msc://``: the same through ckptio-msc on an MSC s3 profile.
* ``DCP FsspecWriter/Reader``: torch's fsspec storage (s3fs), ``thread_count=2``, ``sync_files=False``.
* ``MSC MultiStorageFileSystemWriter/Reader``: MSC's DCP classes, ``thread_count=2``.
* ``boto3 upload_fileobj/download_fileobj``: one object, ``TransferConfig`` 32 MiB x 8 threads (the
  transfer ceiling of a tuned client, no checkpoint format).

Moto is the bottleneck here (one Python process, whole-object copies on ranged GETs), so the
numbers compare clients on this box; they do not predict real S3. Targets (printed PASS/FAIL):
ckptio >= 1.0x DCP fsspec and MSC's writer on save and load; ckptio's peak extra RSS <=
2 x part size x concurrency.
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
import common as C

SCRIPT = Path(__file__).resolve()
MiB = 1 << 20
PART = 32 * MiB
CONCURRENCY = 8
KEY, SECRET, REGION = C.MOTO_KEY, C.MOTO_SECRET, C.MOTO_REGION


# -- worker side ------------------------------------------------------------------------------------
def _state(mib: int, zeros: bool) -> dict[str, Any]:
    import torch

    n = 8
    numel = mib * MiB // 4 // n
    g = torch.Generator().manual_seed(0)
    return {
        f"layer{i}.weight": torch.zeros(numel) if zeros else torch.randn(numel, generator=g) for i in range(n)
    }


def worker(task: dict[str, Any]) -> None:
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}
    )
    import torch

    kind, op, ep, bucket, mib = task["method"], task["op"], task["endpoint"], task["bucket"], task["mib"]
    prefix = f"{kind}"
    sd = _state(mib, zeros=(op == "load"))
    C.touch(sd.values())
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    ref = _state(mib, zeros=False) if op == "load" else None

    def do(sd: dict[str, Any], prefix: str, op: str) -> None:
        if kind in ("ckptio-s3", "ckptio-msc"):
            import ckptio

            url = f"s3://{bucket}/{prefix}" if kind == "ckptio-s3" else f"msc://bench/{prefix}"
            opts = dict(C.moto_storage_options(ep)) if kind == "ckptio-s3" else {}
            opts.update(part_size=PART, concurrency=CONCURRENCY)
            if op == "save":
                ckptio.save(sd, url, storage_options=opts)
            else:
                ckptio.load(sd, url, storage_options=opts, verify=False)
        elif kind == "dcp-fsspec":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

            url = f"s3://{bucket}/{prefix}"
            if op == "save":
                dcp.save(
                    sd,
                    storage_writer=FsspecWriter(
                        url, thread_count=2, sync_files=False, **C.moto_storage_options(ep)
                    ),
                    no_dist=True,
                )
            else:
                dcp.load(sd, storage_reader=FsspecReader(url, **C.moto_storage_options(ep)), no_dist=True)
        elif kind == "msc-dcp":
            import torch.distributed.checkpoint as dcp
            from multistorageclient.contrib.torch import (
                MultiStorageFileSystemReader,
                MultiStorageFileSystemWriter,
            )

            url = f"msc://bench/{prefix}"
            if op == "save":
                dcp.save(sd, storage_writer=MultiStorageFileSystemWriter(url, thread_count=2), no_dist=True)
            else:
                dcp.load(sd, storage_reader=MultiStorageFileSystemReader(url), no_dist=True)
        elif kind == "boto3":
            import io

            from boto3.s3.transfer import TransferConfig

            s3 = C.moto_s3_client(ep)
            cfg = TransferConfig(
                multipart_chunksize=PART, max_concurrency=CONCURRENCY, multipart_threshold=PART
            )
            if op == "save":
                blob = io.BytesIO()
                for t in sd.values():
                    blob.write(t.numpy().tobytes())
                blob.seek(0)
                s3.upload_fileobj(blob, bucket, f"{prefix}/blob", Config=cfg)
            else:
                out = io.BytesIO()
                s3.download_fileobj(bucket, f"{prefix}/blob", out, Config=cfg)
                view = out.getbuffer()
                pos = 0
                for t in sd.values():
                    n = t.numel() * 4
                    t.copy_(torch.frombuffer(view[pos : pos + n], dtype=torch.float32))
                    pos += n
                del view
        else:
            raise ValueError(kind)

    # warm-up on a tiny state: imports, clients and connection pools are set up outside the timed region
    tiny = {k: v[:1024].clone() for k, v in sd.items()}
    do(tiny, f"{kind}-warm", "save")
    if op == "load":
        do(tiny, f"{kind}-warm", "load")
    with C.PeakRss() as mem:
        t0 = time.perf_counter()
        do(sd, prefix, op)
        seconds = time.perf_counter() - t0
    ok = True
    if ref is not None:
        ok = all(torch.equal(sd[k], ref[k]) for k in sd)
    C.emit_result({"seconds": seconds, "bytes": nbytes, "extra_rss_mb": mem.extra_mb, "correct": ok})


# -- driver side ------------------------------------------------------------------------------------
METHODS = [
    ("ckptio-s3", "ckptio s3:// (ckptio-fsspec)"),
    ("ckptio-msc", "ckptio msc:// (ckptio-msc)"),
    ("dcp-fsspec", "DCP FsspecWriter/Reader (s3fs)"),
    ("msc-dcp", "MSC MultiStorageFileSystemWriter/Reader"),
    ("boto3", "boto3 upload/download_fileobj 32 MiB x 8"),
]


OPS = ("save", "load")


def _empty_bucket(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=128, help="payload in MiB (<= 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--only", help="comma-separated methods (default: all): " + ",".join(m for m, _ in METHODS)
    )
    p.add_argument("--worker")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    mib = min(256, args.mib)
    work = Path(tempfile.mkdtemp(prefix="ckptio-bench-cloud-"))
    proc, ep = C.start_moto(work / "moto.log")
    try:
        s3 = C.moto_s3_client(ep)
        bucket = "bench"
        s3.create_bucket(Bucket=bucket)
        cfg = {
            "profiles": {
                "bench": {
                    "storage_provider": {
                        "type": "s3",
                        "options": {"base_path": bucket, "endpoint_url": ep, "region_name": REGION},
                    },
                    "credentials_provider": {
                        "type": "S3Credentials",
                        "options": {"access_key": KEY, "secret_key": SECRET},
                    },
                }
            }
        }
        (work / "msc.json").write_text(json.dumps(cfg))
        os.environ["MSC_CONFIG"] = str(work / "msc.json")
        methods = [m for m, _ in METHODS if not args.only or m in args.only.split(",")]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, op): [] for m in methods for op in OPS}
        # Rounds interleave the methods in a rotating order (moto's speed drifts as it ages), and every method's objects
        # are deleted after its load, so each method meets a server holding the same few objects.
        for rep in range(args.reps):
            for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:  # rotate the order
                for op in OPS:
                    task = {
                        "method": method,
                        "op": op,
                        "endpoint": ep,
                        "bucket": bucket,
                        "mib": mib,
                        "rep": rep,
                    }
                    r = C.run_worker(SCRIPT, task)
                    runs[(method, op)].append(r)
                    print(
                        f"{method:11s} {op:4s} rep{rep}: "
                        + (
                            f"{r['bytes'] / r['seconds'] / MiB:7.1f} MiB/s, +{r['extra_rss_mb']:.0f} MiB RSS"
                            if r.get("ok")
                            else f"FAILED {r.get('error')}"
                        ),
                        flush=True,
                    )
                _empty_bucket(s3, bucket)
        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            row: dict[str, Any] = {}
            for op in OPS:
                good = [r for r in runs[(method, op)] if r.get("ok")]
                speeds = [r["bytes"] / r["seconds"] / MiB for r in good]
                row[op] = {
                    "runs": runs[(method, op)],
                    "best_mib_s": max(speeds, default=None),
                    "median_mib_s": statistics.median(speeds) if speeds else None,
                    "peak_extra_rss_mb": max((r["extra_rss_mb"] for r in good), default=None),
                    "correct": all(r.get("correct", False) for r in good) and bool(good),
                }
            results[method] = row
    finally:
        C.stop_moto(proc)

    def rate(m: str, op: str) -> float | None:
        v = results.get(m, {}).get(op, {}).get("median_mib_s")
        return float(v) if v else None

    def best(m: str, op: str) -> float | None:
        v = results.get(m, {}).get(op, {}).get("best_mib_s")
        return float(v) if v else None

    rows, checks = [], []
    for method, label in METHODS:
        if method not in results:
            continue
        r = results[method]
        rows.append(
            [
                label,
                f"{C.fmt(rate(method, 'save'), 1)} / {C.fmt(best(method, 'save'), 1)}",
                f"{C.fmt(rate(method, 'load'), 1)} / {C.fmt(best(method, 'load'), 1)}",
                C.fmt(r["save"]["peak_extra_rss_mb"], 0),
                C.fmt(r["load"]["peak_extra_rss_mb"], 0),
                "yes" if r["load"]["correct"] else "NO",
            ]
        )
    for base in [m for m in ("dcp-fsspec", "msc-dcp") if m in results and "ckptio-s3" in results]:
        for op in ("save", "load"):
            a, b = rate("ckptio-s3", op), rate(base, op)
            ratio = a / b if a and b else None
            checks.append((f"ckptio s3:// {op} >= 1.0x {base}", ratio, ratio is not None and ratio >= 1.0))
    bound = 2 * PART * CONCURRENCY / MiB
    for op in OPS if "ckptio-s3" in results else ():
        peak = results["ckptio-s3"][op]["peak_extra_rss_mb"]
        checks.append(
            (f"ckptio s3:// {op} peak extra RSS <= {bound:.0f} MiB", peak, peak is not None and peak <= bound)
        )
    for name, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({C.fmt(value)})")
    md = [
        "# Cloud benchmark: s3 on a local moto server",
        "",
        f"Payload {mib} MiB (8 fp32 tensors); {args.reps} rounds, each running every method once (save, then "
        "load) in fresh processes, the order rotated each round, objects deleted after each method; cells are "
        "median / best MiB/s, ratios use medians. Objects up to 64 MiB go as one PUT for ckptio (multipart_threshold "
        "= 2 parts) and for MSC (its default threshold); part/chunk "
        f"{PART // MiB} MiB x {CONCURRENCY}. Moto is the bottleneck (one Python process, whole-object copies on "
        "ranged GETs): compare rows, do not read these as S3 speeds. Extra RSS = peak RSS growth in the timed region.",
        "",
        C.markdown_table(
            [
                "method",
                "save MiB/s med / best",
                "load MiB/s med / best",
                "save +RSS MiB",
                "load +RSS MiB",
                "load correct",
            ],
            rows,
        ),
        "",
        "| target | value | result |",
        "|---|---|---|",
        *[f"| {n} | {C.fmt(v)} | {'PASS' if ok else 'FAIL'} |" for n, v, ok in checks],
        "",
        f"Machine: {json.dumps(C.machine_facts())}",
        "",
    ]
    data = {
        "payload_mib": mib,
        "reps": args.reps,
        "part_size": PART,
        "concurrency": CONCURRENCY,
        "results": results,
        "checks": [{"name": n, "value": v, "pass": ok} for n, v, ok in checks],
    }
    if args.only:  # a partial run is for experiments: print, keep the committed results
        print("\n".join(md))
    else:
        C.write_results("cloud", "\n".join(md), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
