"""Device check for issue 16: ckptio with GPU tensors, on one GPU, in one table.

Run it where a CUDA GPU is present (about 2-4 minutes on one H200 for the default 4 GB)::

    .venv/bin/python benchmarks/gpu_check.py                      # writes benchmarks/results/gpu.md
    .venv/bin/python benchmarks/gpu_check.py --device cpu --size-gb 0.01 --out /tmp/gpu.md   # CPU smoke run

Without CUDA (and without ``--device cpu``) it prints why and exits with status 0, writing nothing.
The exit status is 1 when a correctness row fails or a section errors; performance goals that are
missed show as ``miss`` in the table without changing the status.

What it measures (a bf16 LLM-shaped state of ``--size-gb``, random bits, on the device):

* correctness, bit-exact: ``ckptio.save`` + ``ckptio.load`` of plain tensors; an async save whose
  tensors are changed right after ``save()`` returns; FSDP2 (``fully_shard``, 1 rank) saved through
  ``CheckpointManager(async_save=True)`` (DTensor staging) and loaded into a fresh model;
* time blocked in ``save()``: ckptio async vs ``dcp.async_save`` with a reused ``DefaultStager``
  (pinned memory, non-blocking copies; staging synchronous so the call returns when the tensors
  may change, as ckptio's does) vs ckptio's sync save. The first save also allocates and pins the
  buffers; the goal row uses the median of the later saves;
* device-to-host staging bandwidth of ``HostStager`` vs one pinned ``cudaMemcpy`` of the same size;
* load into existing GPU tensors: ``ckptio.load`` vs ``safetensors.torch.load_file(device=...)``,
  both from the page cache (warm), plus ``DeviceWriter`` (2 x 64 MiB pinned bounce buffers) fed by
  ``os.preadv`` from the safetensors file, to show the bounce-buffer path's own rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MiB = 1 << 20


class Check:
    def __init__(self, dev: torch.device, size_gb: float, work: Path, deadline: float, saves: int) -> None:
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.work = work
        self.deadline = deadline
        self.saves = saves
        self.rows: list[list[str]] = []
        self.failed = False
        self.state = make_state(int(size_gb * GB), dev)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.state.values())
        self.limits: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def row(self, check: str, ours: str, ref: str, ratio: str, goal: str, verdict: str) -> None:
        self.rows.append([check, ours, ref, ratio, goal, verdict])
        print(f"  {check}: {ours} | {ref} | {ratio} | {verdict}", file=sys.stderr, flush=True)

    def section(self, name: str, fn: Callable[[], None]) -> None:
        if time.monotonic() > self.deadline:
            self.row(name, "skipped (out of time)", "—", "—", "—", "skipped")
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            self.failed = True
            self.row(name, f"ERROR: {type(exc).__name__}: {str(exc)[:120]}", "—", "—", "—", "ERROR")
        finally:
            shutil.rmtree(self.work / name.split()[0], ignore_errors=True)
            if self.cuda:
                torch.cuda.empty_cache()
        print(f"[{name}: {time.monotonic() - t0:.1f}s]", file=sys.stderr, flush=True)

    def correct(self, name: str, ok: bool, detail: str, want: str = "bit-exact") -> None:
        self.failed |= not ok
        self.row(f"correctness: {name}", want if ok else detail, "—", "—", want, "PASS" if ok else "FAIL")

    # -- sections --------------------------------------------------------------------------------
    def memcpy_limits(self) -> None:
        n = min(self.nbytes, 1 << 30)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        dev = torch.empty(n, dtype=torch.uint8, device=self.dev)
        for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
            times = []
            for _ in range(5):
                self.sync()
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                self.sync()
                times.append(time.perf_counter() - t0)
            self.limits[name] = n / min(times) / GB
        label = "pinned cudaMemcpy" if self.cuda else "memcpy"
        self.row(
            f"reference: {label} device-to-host / host-to-device, GB/s",
            f"{self.limits['d2h']:.1f} / {self.limits['h2d']:.1f}",
            "—",
            "—",
            "—",
            "info",
        )

    def plain(self) -> None:
        import ckptio

        path = self.work / "plain"
        ckptio.save(self.state, str(path))
        dest = {k: torch.zeros_like(v) for k, v in self.state.items()}
        ckptio.load(dest, str(path))
        self.sync()
        bad = [k for k in self.state if not same_bits(dest[k], self.state[k])]
        self.correct(
            f"save + load, {self.nbytes / GB:.2f} GB bf16 on {self.dev.type}", not bad, f"differs: {bad[:3]}"
        )

    def async_mutation(self) -> None:
        import ckptio

        with ckptio.CheckpointManager(str(self.work / "async"), async_save=True) as mgr:
            mgr.save(1, self.state)
            for t in self.state.values():  # training changes every tensor as soon as save() returns
                t.neg_()
            mgr.wait()
            for t in self.state.values():
                t.neg_()  # exact: flips the sign bit back
            dest = {k: torch.zeros_like(v) for k, v in self.state.items()}
            mgr.load(dest, 1)
        self.sync()
        bad = [k for k in self.state if not same_bits(dest[k], self.state[k])]
        self.correct("async save, tensors changed right after save() returns", not bad, f"differs: {bad[:3]}")

    def fsdp2(self) -> None:
        import ckptio
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.dev.type, (1,))
        h = 4096 if self.nbytes >= 256 * MiB else 256
        layers = max(2, self.nbytes // (h * h * 2))

        def model() -> torch.nn.Module:
            m = torch.nn.Sequential(
                *[
                    torch.nn.Linear(h, h, bias=False, device=self.dev, dtype=torch.bfloat16)
                    for _ in range(layers)
                ]
            )
            for layer in m:
                fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
            return m

        src, dst = model(), model()
        with torch.no_grad():
            for p in dst.parameters():
                p.zero_()
        with ckptio.CheckpointManager(str(self.work / "fsdp2"), async_save=True) as mgr:
            mgr.save(1, {"model": ckptio.ModelState(src)})
            with torch.no_grad():
                for p in src.parameters():
                    p.neg_()
            mgr.wait()
            with torch.no_grad():
                for p in src.parameters():
                    p.neg_()
            mgr.load({"model": ckptio.ModelState(dst)}, 1)
        self.sync()
        pairs = list(zip(src.parameters(), dst.parameters()))
        ok = all(same_bits(local(a), local(b)) for a, b in pairs)
        gb = sum(a.numel() for a, _ in pairs) * 2 / GB
        self.correct(f"FSDP2 1 rank, {gb:.2f} GB, async save + load (DTensor shards)", ok, "differs")
        # the staged shards must stay in (pinned) host memory, not go back to the mesh's device
        from ckptio.staging import HostStager

        stager = HostStager()
        shards = [local(t) for t in stager.stage(ckptio.ModelState(src).state_dict()).values()]
        where = {(t.device.type, stager.device.is_pinned(t)) for t in shards}
        stager.close()
        want = {("cpu", self.cuda)}
        self.correct(
            "FSDP2 shards staged in host buffers" + (", pinned" if self.cuda else ""),
            where == want,
            f"(device, pinned) seen: {where}",
            want="all on cpu" + (", all pinned" if self.cuda else ""),
        )

    def blocked(self) -> None:
        import ckptio
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        times: dict[str, list[float]] = {}
        for variant in ("sync", "async"):
            root = self.work / "blocked" / variant
            mgr = ckptio.CheckpointManager(
                str(root), async_save=variant == "async", retention=ckptio.KeepLatest(1)
            )
            times[variant] = []
            for step in range(self.saves):
                self.sync()
                t0 = time.perf_counter()
                mgr.save(step, self.state)
                times[variant].append(time.perf_counter() - t0)
                self.touch()
                mgr.wait()
            mgr.close()
            shutil.rmtree(root, ignore_errors=True)
        # DCP's pinned staging; synchronous staging, so async_save returns once tensors may change
        pinned = StagingOptions(self.cuda, False, False, self.cuda)
        stager = DefaultStager(pinned)
        times["dcp"] = []
        for step in range(self.saves):
            self.sync()
            t0 = time.perf_counter()
            fut = dcp.async_save(
                self.state, checkpoint_id=str(self.work / "blocked" / f"dcp{step}"), async_stager=stager
            )
            times["dcp"].append(time.perf_counter() - t0)
            self.touch()
            assert isinstance(fut, Future)
            fut.result()
            shutil.rmtree(self.work / "blocked" / f"dcp{step}", ignore_errors=True)
        stager.close()
        safe = []
        if self.cuda:  # DCP with background staging: the caller must still wait before changing tensors
            stager = DefaultStager(StagingOptions(True, False, True, True))
            for step in range(self.saves):
                self.sync()
                t0 = time.perf_counter()
                resp = dcp.async_save(
                    self.state, checkpoint_id=str(self.work / "blocked" / f"dcpa{step}"), async_stager=stager
                )
                assert isinstance(resp, AsyncSaveResponse)
                resp.staging_completion.result()
                safe.append(time.perf_counter() - t0)
                resp.upload_completion.result()
                shutil.rmtree(self.work / "blocked" / f"dcpa{step}", ignore_errors=True)
            stager.close()
        later = {k: statistics.median(v[1:] or v) for k, v in times.items()}
        ratio = later["async"] / later["dcp"]
        dcp_name = (
            "dcp.async_save, pinned DefaultStager" if self.cuda else "dcp.async_save (no pinning on CPU)"
        )
        ok = ratio <= 1.0
        self.row(
            f"blocked in async save, s (median of saves 2..{self.saves})",
            f"{later['async']:.3f}",
            f"{later['dcp']:.3f} ({dcp_name})",
            f"{ratio:.2f}",
            "≤ 1.0",
            "met" if ok else "miss",
        )
        self.row(
            "blocked in first async save (allocates, pins), s",
            f"{times['async'][0]:.3f}",
            f"{times['dcp'][0]:.3f}",
            f"{times['async'][0] / times['dcp'][0]:.2f}",
            "—",
            "info",
        )
        self.row(
            "blocked in ckptio sync save, s (median 2..)",
            f"{later['sync']:.3f}",
            "—",
            f"async/sync {later['async'] / later['sync']:.2f}",
            "—",
            "info",
        )
        if safe:
            self.row(
                "dcp async staging: s until staging_completion (median 2..)",
                "—",
                f"{statistics.median(safe[1:] or safe):.3f}",
                "—",
                "—",
                "info",
            )

    def touch(self) -> None:
        """A training step between saves: every tensor changes (exactly reversibly)."""
        for t in self.state.values():
            t.neg_()

    def staging(self) -> None:
        from ckptio.staging import HostStager

        stager = HostStager()
        self.sync()
        t0 = time.perf_counter()
        stager.stage(self.state)
        first = time.perf_counter() - t0
        times = []
        for _ in range(3):
            self.sync()
            t0 = time.perf_counter()
            staged = stager.stage(self.state)
            times.append(time.perf_counter() - t0)
        bad = [k for k in self.state if not same_bits(staged[k], self.state[k])]
        pinned = stager.pinned_bytes / self.nbytes
        stager.close()
        rate = self.nbytes / min(times) / GB
        ratio = rate / self.limits["d2h"]
        self.row(
            f"device-to-host staging (HostStager), GB/s; {pinned:.0%} pinned; first stage {first:.2f}s",
            f"{rate:.1f}",
            f"{self.limits['d2h']:.1f} (one {min(self.nbytes, 1 << 30) / GB:.2f} GB memcpy)",
            f"{ratio:.2f}",
            "≥ 0.8",
            "met" if ratio >= 0.8 else "miss",
        )
        if bad:
            self.correct("staged bytes", False, f"differs: {bad[:3]}")

    def loads(self) -> None:
        import ckptio
        import ckptio.formats.native
        from safetensors.torch import load_file, save_file

        path, st = self.work / "loads" / "ckpt", self.work / "loads" / "model.safetensors"
        ckptio.save(self.state, str(path))
        save_file({k: v.cpu() for k, v in self.state.items()}, str(st))
        dest = {k: torch.empty_like(v) for k, v in self.state.items()}

        def ours() -> None:
            ckptio.load(dest, str(path))

        def theirs() -> None:
            loaded = load_file(str(st), device=str(self.dev))
            if self.cuda:  # new GPU tensors, as a user of load_file gets them
                dest.update(loaded)
            else:  # mmap-backed: copy, so the bytes are really read
                for k, v in loaded.items():
                    dest[k].copy_(v)

        def bounce() -> None:
            load_safetensors_via_device_writer(st, dest)

        rates = {}
        for name, fn in (("ckptio", ours), ("safetensors", theirs), ("bounce", bounce)):
            times = []
            for _ in range(2):  # the first run also warms the page cache
                for t in dest.values():
                    t.zero_()
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
            bad = [k for k in self.state if not same_bits(dest[k], self.state[k])]
            if bad:
                self.correct(f"load via {name}", False, f"differs: {bad[:3]}")
            rates[name] = self.nbytes / min(times) / GB
        ratio = rates["ckptio"] / rates["safetensors"]
        wired = "DeviceWriter" in Path(ckptio.formats.native.__file__).read_text()
        self.row(
            f"load into {self.dev.type} tensors, GB/s (warm page cache; native reader "
            f"{'uses' if wired else 'does not use yet'} DeviceWriter)",
            f"{rates['ckptio']:.2f} (ckptio.load)",
            f"{rates['safetensors']:.2f} (safetensors load_file)",
            f"{ratio:.2f}",
            "≥ 1.0",
            "met" if ratio >= 1.0 else "miss",
        )
        self.row(
            "DeviceWriter 2 x 64 MiB pinned, preadv from the .safetensors file, GB/s",
            f"{rates['bounce']:.2f}",
            f"{rates['safetensors']:.2f}",
            f"{rates['bounce'] / rates['safetensors']:.2f}",
            "—",
            "info",
        )


def load_safetensors_via_device_writer(path: Path, dest: dict[str, torch.Tensor]) -> None:
    """Fill ``dest`` from a safetensors file through ckptio's bounce-buffer loader."""
    from ckptio._device import DeviceWriter

    fd = os.open(path, os.O_RDONLY)
    try:
        (hlen,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, hlen, 8))
        base = 8 + hlen

        def reader(start: int) -> Callable[[int, memoryview], None]:
            def read(off: int, view: memoryview) -> None:
                got = os.preadv(fd, [view], base + start + off)
                if got != len(view):
                    raise OSError(f"short read in {path}")

            return read

        with ThreadPoolExecutor(4) as pool, DeviceWriter(dest[next(iter(dest))].device, read_pool=pool) as w:
            for name, t in dest.items():
                w.copy_into(t, reader(header[name]["data_offsets"][0]))
    finally:
        os.close(fd)


def make_state(nbytes: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """LLM-shaped bf16 tensors of random bits: an embedding whose size is no multiple of the
    bounce buffers, then square matrices and norms."""
    h = 4096 if nbytes >= 256 * MiB else 256
    vocab = 50257 if nbytes >= 256 * MiB else 301
    g = torch.Generator(device=dev).manual_seed(0)
    state = {"embed": torch.randn(vocab, h, generator=g, device=dev, dtype=torch.bfloat16)}
    for i in range(max(1, (nbytes - vocab * h * 2) // (h * h * 2))):
        state[f"layers.{i}.weight"] = torch.randn(h, h, generator=g, device=dev, dtype=torch.bfloat16)
        state[f"layers.{i}.norm"] = torch.randn(h, generator=g, device=dev, dtype=torch.bfloat16)
    return state


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
    )


def default_work_dir(size_gb: float) -> Path:
    """tmpfs when it holds 4 states (the check then does not depend on the disk), else the repo's
    git-ignored work folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 * size_gb * GB:
        return shm
    return ROOT / "benchmarks" / "work"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="state size in GB (default 4)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test the script")
    ap.add_argument("--saves", type=int, default=3, help="saves per variant in the blocked-time rows")
    ap.add_argument("--work-dir", help="where checkpoints go (default: /dev/shm when it has room)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    ap.add_argument("--time-budget-s", type=float, default=420, help="skip the remaining sections after this")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}): "
            "nothing to check; use --device cpu --size-gb 0.01 to smoke-test this script"
        )
        return 0
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    started = time.monotonic()
    # a folder of our own inside the work dir: only it is ever removed
    work = Path(args.work_dir or default_work_dir(args.size_gb)) / f"ckptio_gpu_check_{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{work}/pg", rank=0, world_size=1)
    try:
        check = Check(dev, args.size_gb, work, started + args.time_budget_s, max(2, args.saves))
        for name, fn in (
            ("memcpy limits", check.memcpy_limits),
            ("plain save+load", check.plain),
            ("async mutation", check.async_mutation),
            ("fsdp2", check.fsdp2),
            ("blocked", check.blocked),
            ("staging", check.staging),
            ("loads", check.loads),
        ):
            check.section(name, fn)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke run: no GPU)"
    head = (
        f"GPU check (issue 16) on {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"state {check.nbytes / GB:.2f} GB bf16 in {len(check.state)} tensors; files in {work}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {time.monotonic() - started:.0f}s in all."
    )
    table = ["| check | ckptio | reference | ratio | goal | verdict |", "|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in check.rows]
    text = head + "\n\n" + "\n".join(table) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
