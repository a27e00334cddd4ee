"""GPU staging and loading logic, exercised on the CPU through ``ckptio._device.Device`` subclasses.

``FakeAccelerator`` treats CPU tensors as device tensors, pins by bookkeeping, and (like a CUDA
stream) defers each copy until a fence or ``synchronize()`` asks for it. A stager that returned
before synchronising, or a loader that refilled a bounce buffer before its copy's fence, would
therefore hand out wrong bytes here, as it would on a GPU. Tests that need CUDA skip without it.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptio._device import Device, DeviceWriter, Fence, PinBudget, host_bytes
from ckptio.staging import HostStager

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeAccelerator(Device):
    """A CPU stand-in for an accelerator: deferred in-order copies, pinning by bookkeeping."""

    pins = True

    def __init__(
        self, *, on_device: Callable[[torch.Tensor], bool] = lambda t: True, pin_error: str | None = None
    ) -> None:
        self.on_device = on_device
        self.pin_error = pin_error
        self.log: list[tuple[Any, ...]] = []
        self.queue: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # None once done
        self.done = 0
        self.pinned: dict[int, int] = {}  # ptr -> bytes

    def is_device(self, t: torch.Tensor) -> bool:
        return self.on_device(t)

    def start(self) -> None:
        self.log.append(("start",))

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append(("copy", src.data_ptr()))
        self.queue.append((dst, src))

    def run_until(self, n: int) -> None:
        while self.done < n:
            item, self.queue[self.done] = self.queue[self.done], None
            assert item is not None
            item[0].copy_(item[1])  # reads the source now, as a DMA engine would on the copy's turn
            self.done += 1

    def fence(self) -> Fence:
        n = len(self.queue)
        dev = self

        class _F:
            def wait(self) -> None:
                dev.log.append(("wait", n))
                dev.run_until(n)

        return _F()

    def synchronize(self) -> None:
        self.log.append(("sync",))
        self.run_until(len(self.queue))

    def pin(self, region: torch.Tensor) -> None:
        if self.pin_error:
            raise RuntimeError(self.pin_error)
        assert region.data_ptr() % 4096 == 0 and region.numel() % 4096 == 0, "pin whole pages only"
        self.pinned[region.data_ptr()] = region.numel()
        self.log.append(("pin", region.data_ptr()))

    def unpin(self, ptr: int) -> None:
        del self.pinned[ptr]
        self.log.append(("unpin", ptr))

    def is_pinned(self, t: torch.Tensor) -> bool:
        return any(p <= t.data_ptr() < p + n for p, n in self.pinned.items())


def sample_state() -> dict[str, Any]:
    return {
        "model": {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16)},
        "opt": [torch.arange(10), {"step": torch.tensor(3.0)}],
        "meta": {"epoch": 2},
    }


def leaves(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in leaves(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in leaves(v)]
    return []


# -- staging (save) ---------------------------------------------------------------------------
def test_stage_waits_for_every_copy_before_returning() -> None:
    dev = FakeAccelerator()
    stager = HostStager(device=dev, pinned_limit_bytes=1 << 30)
    state = sample_state()
    expected = [t.clone() for t in leaves(state)]
    staged = stager.stage(state)
    for t in leaves(state):  # training changes everything as soon as save() returns
        t.zero_()
    assert all(torch.equal(a, b) for a, b in zip(leaves(staged), expected))
    assert staged["meta"] == {"epoch": 2}
    kinds = [e[0] for e in dev.log if e[0] != "pin"]
    assert kinds == ["start"] + ["copy"] * 4 + ["sync"], "all copies enqueued, then one wait"
    assert all(dev.is_pinned(t) for t in leaves(staged))
    assert stager.bytes_staged == sum(t.numel() * t.element_size() for t in expected)


def test_only_device_tensors_are_pinned_and_cpu_tensors_are_copied() -> None:
    # pytorch#144657: a CPU tensor must be copied, or the background write sees later updates
    dev = FakeAccelerator(on_device=lambda t: t.dtype == torch.bfloat16)
    stager = HostStager(device=dev, pinned_limit_bytes=1 << 30)
    state = sample_state()
    staged = stager.stage(state)
    assert [e for e in dev.log if e[0] == "copy"] == [("copy", state["model"]["b"].data_ptr())]
    assert dev.is_pinned(staged["model"]["b"]) and not dev.is_pinned(staged["model"]["w"])
    before = staged["model"]["w"].clone()
    state["model"]["w"].add_(1)
    assert torch.equal(staged["model"]["w"], before)
    assert staged["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()


def test_host_only_device_copies_without_pinning_or_warnings() -> None:
    stager = HostStager(device=Device())
    state = sample_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        staged = stager.stage(state)
    ptrs = {t.data_ptr() for t in leaves(state)}
    assert not ptrs & {t.data_ptr() for t in leaves(staged)}
    assert stager.pinned_bytes == 0


def test_buffers_are_reused_keyed_on_name_and_layout() -> None:
    dev = FakeAccelerator()
    stager = HostStager(device=dev, pinned_limit_bytes=1 << 30)
    state = {"a": torch.randn(8, 8), "b": torch.randn(16)}
    first = stager.stage(state)
    pins = len(dev.pinned)
    second = stager.stage(state)
    assert first["a"].data_ptr() == second["a"].data_ptr() and len(dev.pinned) == pins
    # same name, new shape (uneven resharding, torchtitan#1136): a new buffer, the old one unpinned
    old = second["b"].data_ptr()
    state["b"] = torch.randn(20)
    third = stager.stage(state)
    assert third["b"].data_ptr() != old and torch.equal(third["b"], state["b"])
    assert not any(p <= old < p + n for p, n in dev.pinned.items())
    # same shape and dtype, another stride: not reused either
    state["a"] = torch.randn(8, 8).t()
    fourth = stager.stage(state)
    assert fourth["a"].data_ptr() != third["a"].data_ptr() and torch.equal(fourth["a"], state["a"])
    # a tensor that disappears loses its buffer and its pinning
    del state["b"]
    stager.stage(state)
    assert set(stager._buffers) == {"a"} and len(dev.pinned) == 1
    assert stager.budget.used == sum(dev.pinned.values())


def test_pin_failure_falls_back_to_pageable_with_one_warning() -> None:
    dev = FakeAccelerator(pin_error="cudaErrorMemoryAllocation")
    stager = HostStager(device=dev, pinned_limit_bytes=1 << 30)
    state = sample_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            staged = stager.stage(state)
            state["model"]["w"] = torch.randn(64 + len(caught), 32)  # forces new allocations too
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "cudaErrorMemoryAllocation" in msgs[0] and "pageable" in msgs[0]
    assert stager.pinned_bytes == 0 and stager.budget.used == 0
    assert torch.equal(staged["opt"][0], torch.arange(10))


def test_pinned_memory_is_bounded() -> None:
    dev = FakeAccelerator()
    stager = HostStager(device=dev, pinned_limit_bytes=2 * 4096)
    state = {f"t{i}": torch.randn(1024) for i in range(5)}  # one page each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        staged = stager.stage(state)
        stager.stage(state)
    assert len([w for w in caught if "limit" in str(w.message)]) == 1
    assert stager.pinned_bytes == 2 * 4096 and stager.budget.used == 2 * 4096
    assert all(torch.equal(staged[k], state[k]) for k in state)
    stager.close()
    assert dev.pinned == {} and stager.budget.used == 0


def test_collected_buffers_are_unpinned() -> None:
    dev = FakeAccelerator()
    stager = HostStager(device=dev, pinned_limit_bytes=1 << 20)
    budget = stager.budget
    staged = stager.stage({"x": torch.randn(3000), "y": torch.randn(10)})
    assert len(dev.pinned) == 2
    del stager
    gc.collect()
    assert len(dev.pinned) == 2, "still in use by the staged copy"
    del staged
    gc.collect()
    assert dev.pinned == {} and budget.used == 0


def test_dtensor_shards_stay_in_host_buffers(tmp_path: Path) -> None:
    """A staged DTensor keeps its mesh and placements but its shard stays in the host buffer:
    ``DTensor.from_local`` would move it back to the mesh's device (here a GPU mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cuda", [0], _init_backend=False)  # never used for data here
        local = torch.randn(8, 4)
        expected = local.clone()
        spec = DTensorSpec(
            mesh, (Shard(0),), tensor_meta=TensorMeta(local.shape, local.stride(), local.dtype)
        )
        value = DTensor(local, spec, requires_grad=False)  # type: ignore[call-arg]
        dev = FakeAccelerator()
        stager = HostStager(device=dev, pinned_limit_bytes=1 << 20)
        staged = stager.stage({"w": value})["w"]
        local.zero_()
        assert (
            isinstance(staged, DTensor)
            and staged.device_mesh is mesh
            and staged.placements == value.placements
        )
        shard = staged.to_local()
        assert shard.device.type == "cpu" and shard.data_ptr() == stager._buffers["w"].data_ptr()
        assert dev.is_pinned(shard) and torch.equal(shard, expected)
        # and the planner writes it from there without touching the (absent) GPU
        import ckptio

        ckptio.save({"w": staged}, str(tmp_path / "ck"))
        out = {"w": torch.zeros(8, 4)}
        ckptio.load(out, str(tmp_path / "ck"))
        assert torch.equal(out["w"], expected)
    finally:
        dist.destroy_process_group()


def test_stagers_can_share_one_budget() -> None:
    budget = PinBudget(3 * 4096)
    a, b = (HostStager(device=FakeAccelerator(), budget=budget) for _ in range(2))
    state = {"x": torch.randn(1024), "y": torch.randn(1024)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a.stage(state)
        b.stage(state)
    assert a.pinned_bytes + b.pinned_bytes == 3 * 4096 == budget.used and len(caught) == 1


def test_pin_thread_runs_registrations_elsewhere_and_nested_calls_in_place() -> None:
    import threading

    from ckptio import _device

    seen = []

    def outer() -> str:
        seen.append(threading.current_thread().name)
        return _device._on_pin_thread(lambda: threading.current_thread().name)  # no deadlock

    inner = _device._on_pin_thread(outer)
    assert seen[0].startswith("ckptio-pin") and inner == seen[0] != threading.current_thread().name


def test_pinned_regions_have_pages_of_their_own() -> None:
    for n in (1, 4095, 4097, 9 << 20):
        region = host_bytes(n)
        assert region.data_ptr() % 4096 == 0 and region.numel() % 4096 == 0 and region.numel() >= n


# -- loading ------------------------------------------------------------------------------------
def source(nbytes: int) -> tuple[bytes, Callable[[int, memoryview], None], list[tuple[int, int]]]:
    data = os.urandom(nbytes)
    calls: list[tuple[int, int]] = []

    def read(offset: int, view: memoryview) -> None:
        calls.append((offset, len(view)))
        view[:] = data[offset : offset + len(view)]

    return data, read, calls


def test_device_writer_overlaps_reads_with_copies_and_reuses_two_buffers() -> None:
    dev = FakeAccelerator()
    writer = DeviceWriter(dev, bounce_bytes=4096, piece_bytes=1024, budget=PinBudget(1 << 20))
    bufs = [b.data_ptr() for b in writer._bufs]
    dst = torch.empty(5 * 4096 + 100, dtype=torch.uint8)
    data, read, calls = source(dst.numel())
    pending_at_read: list[int] = []

    def read_and_look(offset: int, view: memoryview) -> None:
        pending_at_read.append(len(dev.queue) - dev.done)
        read(offset, view)

    writer.copy_into(dst, read_and_look)
    # window k+1 is read while the copy of window k is still queued
    assert pending_at_read[:4] == [0] * 4 and set(pending_at_read[4:]) == {1}
    assert {off for off, _ in calls} == set(range(0, dst.numel(), 1024))
    assert all(e[1] in bufs for e in dev.log if e[0] == "copy"), "never more than two host buffers"
    writer.close()
    assert bytes(dst.numpy()) == data
    assert dev.pinned == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
def test_device_writer_fills_tensors_of_any_dtype(dtype: torch.dtype) -> None:
    ref = (torch.randn(37, 129) * 100).to(dtype)
    dst = torch.zeros_like(ref)
    raw = ref.reshape(-1).view(torch.uint8).numpy().tobytes()
    with DeviceWriter(FakeAccelerator(), 4096, piece_bytes=1024, budget=PinBudget(1 << 20)) as w:
        w.copy_into(dst, lambda off, view: view.__setitem__(slice(None), raw[off : off + len(view)]))
        w.copy_into(torch.empty(0, dtype=dtype), lambda off, view: None)
    assert torch.equal(dst, ref)


def test_device_writer_reads_pieces_in_parallel() -> None:
    dst = torch.empty(3 * 8192 + 5, dtype=torch.uint8)
    data, read, calls = source(dst.numel())
    with ThreadPoolExecutor(3) as pool:
        with DeviceWriter(FakeAccelerator(), 8192, piece_bytes=2048, read_pool=pool) as w:
            w.copy_into(dst, read)
    assert bytes(dst.numpy()) == data and all(off % 2048 == 0 for off, _ in calls)


def test_device_writer_without_pinning() -> None:
    dst = torch.empty(10_000, dtype=torch.uint8)
    data, read, _ = source(dst.numel())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dev = FakeAccelerator(pin_error="no")
        with DeviceWriter(dev, 4096, piece_bytes=4096, budget=PinBudget(1 << 20)) as w:
            assert w.pinned == 0
            w.copy_into(dst, read)
        with DeviceWriter(Device(), 4096, piece_bytes=4096) as w:  # the host: nothing to pin, no warning
            w.copy_into(dst, read)
    assert len(caught) == 1 and bytes(dst.numpy()) == data


def test_device_writer_errors() -> None:
    dev = FakeAccelerator()
    w = DeviceWriter(dev, 4096, piece_bytes=4096, budget=PinBudget(1 << 20))
    with pytest.raises(ValueError):
        w.copy_into(torch.empty(4, 4).t(), lambda off, view: None)

    def failing(off: int, view: memoryview) -> None:
        if off >= 8192:
            raise OSError("read failed")

    with pytest.raises(OSError):
        with w:
            w.copy_into(torch.empty(4 * 4096, dtype=torch.uint8), failing)
    assert dev.done == len(dev.queue) and dev.pinned == {}, "closing waits for queued copies, then unpins"
    with pytest.raises(ValueError):
        DeviceWriter(dev, 4096, piece_bytes=3000)


# -- CUDA (skipped without a device) ------------------------------------------------------------
@cuda
def test_cuda_stage_is_pinned_and_safe_to_mutate() -> None:
    state = {"w": torch.randn(1024, 1024, device="cuda"), "cpu": torch.randn(10)}
    expected = {k: v.clone() for k, v in state.items()}
    stager = HostStager(pinned_limit_bytes=1 << 30)
    staged = stager.stage(state)
    for t in state.values():
        t.zero_()
    assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
    assert torch.equal(staged["w"], expected["w"].cpu()) and torch.equal(staged["cpu"], expected["cpu"])
    stager.close()


@cuda
def test_cuda_device_writer() -> None:
    ref = torch.randn(3 << 20, dtype=torch.bfloat16)
    raw = ref.view(torch.uint8).numpy().tobytes()
    dst = torch.empty(ref.shape, dtype=ref.dtype, device="cuda")
    with DeviceWriter("cuda", 1 << 20, piece_bytes=1 << 20) as w:
        assert w.pinned == 2
        w.copy_into(dst, lambda off, view: view.__setitem__(slice(None), raw[off : off + len(view)]))
    assert torch.equal(dst.cpu(), ref)


# -- the device check script ------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size-gb", "0.004"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--work-dir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table.count("| correctness") == 4 and "FAIL" not in table and "ERROR" not in table
    assert "blocked" in table and "load" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_check_without_cuda_exits_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "gpu.md")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.md").exists()


def test_native_reader_fills_device_tensors_through_the_bounce_buffers(tmp_path: Path) -> None:
    """The native reader's accelerator path (``read_to_device``), run with host destinations:
    every chunk arrives whole, and a damaged byte is caught on the way, as on the host path."""
    import ckptio
    from ckptio.checkpoint import open_backend, read_manifest
    from ckptio.errors import CorruptCheckpointError
    from ckptio.formats.native import BLOCK, NativeReader

    state = {"big": torch.arange(3 * BLOCK // 4 + 7, dtype=torch.float32), "small": torch.full((5, 3), 2.5)}
    url = str(tmp_path / "ckpt")
    ckptio.save(state, url)
    u, backend = open_backend(url)
    with backend:
        manifest = read_manifest(backend, u.path)
        assert manifest is not None
        reader = NativeReader(backend, u.path, manifest)
        items = [(e, torch.empty(e.sizes, dtype=e.dtype)) for e in reader.entries.values() if e.sizes]
        reader.read_to_device(items, None)
        got = {e.fqn: dst for e, dst in items}
        assert torch.equal(got["big"], state["big"]) and torch.equal(got["small"], state["small"])
        big = next(e for e, _ in items if e.fqn == "big")
        with open(tmp_path / "ckpt" / big.file, "r+b") as f:
            f.seek(big.pos + BLOCK + 3)
            byte = f.read(1)
            f.seek(big.pos + BLOCK + 3)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            reader.read_to_device([(big, torch.empty(big.sizes, dtype=big.dtype))], None)
