"""Shared helpers for the ckptio benchmarks.

Everything here is plain stdlib + torch so that the harness runs before ckptio itself is importable.

Conventions used by every benchmark:

* GB means 10**9 bytes; GB/s is payload bytes (the tensor bytes of the state dict) per second.
* Each repetition runs in a fresh subprocess (see :func:`run_worker`), so peak RSS can be measured and every
  repetition pays the same process-start costs (first-touch page faults etc.) as a real restart.
* "extra RSS" is ``VmHWM - VmRSS`` where the peak was reset right before the timed region with
  ``echo 5 > /proc/self/clear_refs``. It includes file-backed (mmap) pages.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_WORK_DIR = BENCH_DIR / "work"

GB = 1e9
MiB = 1 << 20
PAGE = 4096
SCALE_ENV = "CKPTIO_BENCH_SCALE"

# ---------------------------------------------------------------------------------------------------------------
# State dict: a ~2.19 GB LLM-shaped state dict (195 tensors), scalable by --scale / $CKPTIO_BENCH_SCALE.
# ---------------------------------------------------------------------------------------------------------------

HIDDEN = 2048
FFN = 5632
VOCAB = 44000
LAYERS = 16


def default_scale() -> float:
    """The scale from ``$CKPTIO_BENCH_SCALE`` (default 1.0)."""
    raw = os.environ.get(SCALE_ENV, "").strip()
    return float(raw) if raw else 1.0


def llm_spec(scale: float = 1.0) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype-name) for every tensor of the benchmark state dict.

    The tensor count (195) is fixed; ``scale`` shrinks the leading dimension of the big matrices, so the total byte
    count scales about linearly while per-tensor overheads stay realistic.
    """

    def rows(n: int) -> int:
        return max(1, round(n * scale))

    spec: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (rows(VOCAB), HIDDEN), "float32")
    ]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v"):
            spec.append((f"{p}self_attn.{proj}_proj.weight", (rows(HIDDEN), HIDDEN), "bfloat16"))
            spec.append((f"{p}self_attn.{proj}_proj.bias", (HIDDEN,), "float32"))
        spec.append((f"{p}self_attn.o_proj.weight", (rows(HIDDEN), HIDDEN), "bfloat16"))
        for proj in ("gate", "up"):
            spec.append((f"{p}mlp.{proj}_proj.weight", (rows(FFN), HIDDEN), "bfloat16"))
        spec.append((f"{p}mlp.down_proj.weight", (rows(FFN), HIDDEN), "bfloat16"))
        spec.append((f"{p}input_layernorm.weight", (HIDDEN,), "float32"))
        spec.append((f"{p}post_attention_layernorm.weight", (HIDDEN,), "float32"))
    spec.append(("model.norm.weight", (HIDDEN,), "float32"))
    spec.append(("lm_head.weight", (rows(VOCAB), HIDDEN), "bfloat16"))
    return spec


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "uint8": 1}


def spec_nbytes(spec: Iterable[tuple[str, tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * _ITEMSIZE[dt] for _, shape, dt in spec)


_PATTERN_BYTES = 32 * MiB
_pattern_cache: Any = None


def _pattern() -> Any:
    """A fixed random byte block (doubled so any window of _PATTERN_BYTES can be sliced without wrapping)."""
    global _pattern_cache
    if _pattern_cache is None:
        import torch

        g = torch.Generator().manual_seed(1234)
        block = torch.randint(0, 256, (_PATTERN_BYTES,), dtype=torch.uint8, generator=g)
        _pattern_cache = torch.cat([block, block])
    return _pattern_cache


def _start_offset(index: int) -> int:
    return (index * 1_000_003 * 64) % _PATTERN_BYTES


def _as_bytes(t: Any) -> Any:
    import torch

    return t.detach().reshape(-1).view(torch.uint8)


def _fill(t: Any, index: int) -> None:
    pat = _pattern()
    b = _as_bytes(t)
    n = b.numel()
    off = _start_offset(index)
    pos = 0
    while pos < n:
        c = min(n - pos, _PATTERN_BYTES)
        b[pos : pos + c].copy_(pat[off : off + c])
        pos += c
        off = (off + c) % _PATTERN_BYTES


def make_state_dict(scale: float = 1.0, *, zeros: bool = False) -> dict[str, Any]:
    """Allocate the benchmark state dict.

    ``zeros=False``: deterministic random-looking bytes (incompressible, may include NaN bit patterns, which is
    fine for I/O). ``zeros=True``: zero-filled, i.e. pre-touched destination tensors, like an existing model.
    Every page is written either way, so no first-touch page faults remain.
    """
    import torch

    sd: dict[str, Any] = {}
    for i, (name, shape, dt) in enumerate(llm_spec(scale)):
        t = torch.empty(shape, dtype=getattr(torch, dt))
        if zeros:
            t.zero_()
        else:
            _fill(t, i)
        sd[name] = t
    return sd


def verify_state_dict(sd: dict[str, Any], scale: float = 1.0, sample: int = 1 * MiB) -> tuple[bool, str]:
    """Cheap bit-exact check: the first ``sample`` bytes and the last 4 KiB of every tensor vs. the pattern."""
    pat = _pattern()
    spec = llm_spec(scale)
    if set(sd) != {n for n, _, _ in spec}:
        return False, "key set differs"
    for i, (name, shape, dt) in enumerate(spec):
        t = sd[name]
        if tuple(t.shape) != shape or str(t.dtype) != f"torch.{dt}":
            return False, f"{name}: shape/dtype {tuple(t.shape)} {t.dtype}"
        b = _as_bytes(t.contiguous())
        n = b.numel()
        off = _start_offset(i)
        head = min(n, sample)
        if not bool((b[:head] == pat[off : off + head]).all()):
            return False, f"{name}: head bytes differ"
        tail = min(n, PAGE)
        toff = (off + n - tail) % _PATTERN_BYTES
        if not bool((b[n - tail :] == pat[toff : toff + tail]).all()):
            return False, f"{name}: tail bytes differ"
    return True, "ok"


def touch(tensors: Iterable[Any]) -> int:
    """Read one byte per 4 KiB page of every tensor (forces lazily mapped data into memory)."""
    total = 0
    for t in tensors:
        b = _as_bytes(t.contiguous() if not t.is_contiguous() else t)
        if b.numel():
            total += int(b[::PAGE].sum())
    return total


def copy_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, t in dst.items():
        t.copy_(src[k])


# ---------------------------------------------------------------------------------------------------------------
# Memory, caches, durability
# ---------------------------------------------------------------------------------------------------------------


def proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS. Returns False where /proc/self/clear_refs is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Measures the peak RSS growth of a region: ``with PeakRss() as m: ...; m.extra_mb``."""

    def __enter__(self) -> PeakRss:
        self.reset_ok = reset_peak_rss()
        self.rss0 = proc_status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = proc_status_kb("VmHWM")
        if hwm is None:  # not Linux: fall back to getrusage (cannot be reset)
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.extra_mb = max(0, hwm - self.rss0) / 1024.0


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``. Returns False where not permitted (then loads are not cold)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def iter_files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in sorted(files):
                yield Path(root) / name


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` plus its parent (cheap for already-synced files)."""
    for p in iter_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = [path.parent]
    if path.is_dir():
        dirs += [Path(root) for root, _d, _f in os.walk(path)]
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_all(path: Path, chunk: int = 16 * MiB) -> int:
    """Read every file under ``path`` (puts it into the page cache)."""
    total = 0
    buf = bytearray(chunk)
    for p in iter_files(path):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def tree_size(path: Path) -> tuple[int, int]:
    files = list(iter_files(path))
    return len(files), sum(p.stat().st_size for p in files)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Machine facts, noise, stats
# ---------------------------------------------------------------------------------------------------------------


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def top_processes(n: int = 5) -> list[str]:
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()) for line in out.splitlines()[:n]]


def _mount_of(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        parts = out[-1].split()
        return f"{parts[0]} ({parts[1]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def machine_facts(work_dir: Path | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["ram_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            facts["thp"] = f.read().strip()
    except OSError:
        pass
    for mod in ("torch", "safetensors", "ckptio"):
        try:
            m = __import__(mod)
            facts[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # ckptio may not exist yet
            facts[mod] = f"not importable ({type(e).__name__})"
    if work_dir is not None:
        facts["work_fs"] = _mount_of(work_dir)
    facts["loadavg_start"] = loadavg()
    facts["top_processes_start"] = top_processes()
    return facts


def best_median(values: list[float], *, higher_is_better: bool = False) -> tuple[float, float]:
    """(best, median) of a list of times (lower is better) or rates."""
    best = max(values) if higher_is_better else min(values)
    return best, statistics.median(values)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def write_results(name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"{name}.md"
    js = RESULTS_DIR / f"{name}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return md, js


# ---------------------------------------------------------------------------------------------------------------
# Fresh-subprocess workers
# ---------------------------------------------------------------------------------------------------------------

RESULT_PREFIX = "BENCH_RESULT "


def emit_result(result: dict[str, Any]) -> None:
    """Called inside a worker: print the result line that :func:`run_worker` parses."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def run_worker(script: Path, task: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh process and return its result dict.

    Never raises for a failing worker: the returned dict then has ``ok=False`` and an ``error``.
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(task)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX) :])
            res.setdefault("ok", True)
            res["worker_wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"ok": False, "error": f"rc={proc.returncode}: " + " / ".join(tail), "worker_wall_s": wall}


# ---------------------------------------------------------------------------------------------------------------
# A local S3 server (moto) for the cloud benchmarks
# ---------------------------------------------------------------------------------------------------------------

MOTO_KEY = MOTO_SECRET = "testing"
MOTO_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(log: Path, timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``moto_server`` on a free port (its output appended to ``log``) and wait until it
    answers; returns the process and its endpoint URL. Stop it with :func:`stop_moto`."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    cmd = (
        [str(exe), "-H", "127.0.0.1", "-p", str(port)]
        if exe.exists()
        else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    )
    env = dict(os.environ, AWS_ACCESS_KEY_ID=MOTO_KEY, AWS_SECRET_ACCESS_KEY=MOTO_SECRET)
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    ep = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{ep}/moto-api/", timeout=1).read()
            return proc, ep
        except Exception:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError("moto_server did not start")


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server from :func:`start_moto`: terminate, then kill after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def moto_storage_options(ep: str) -> dict[str, Any]:
    """s3fs ``storage_options`` for the moto server at ``ep``."""
    return {
        "key": MOTO_KEY,
        "secret": MOTO_SECRET,
        "client_kwargs": {"endpoint_url": ep, "region_name": MOTO_REGION},
    }


def moto_s3_client(ep: str) -> Any:
    """A boto3 S3 client for the moto server at ``ep``."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=ep,
        aws_access_key_id=MOTO_KEY,
        aws_secret_access_key=MOTO_SECRET,
        region_name=MOTO_REGION,
    )
