"""What staging and loading need from an accelerator, behind one small class.

Saving from, or loading into, accelerator tensors needs four things from the accelerator:

* page-locked ("pinned") host memory, so DMA copies run at full link speed and asynchronously;
* a copy enqueued on a side stream, so copies of many tensors run back to back without the host
  waiting on each one, and without queueing behind (or in front of) the training kernels;
* a fence after a copy, to know when its host buffer may be reused;
* a wait for everything enqueued.

:class:`Device` is the host itself: synchronous ``copy_`` and no pinning, which is correct for any
pair of tensors. :class:`CudaDevice` does the four things with CUDA. The staging and loading logic
(``staging.HostStager``, :class:`DeviceWriter`) only talks to a ``Device``, so CPU-only tests reach
its ordering, reuse and fallback branches with real subclasses (that record calls, defer copies
until a fence, or refuse to pin) rather than with mocks of torch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from ._buffers import tensor_memoryview

PAGE = 4096
HUGE = 2 << 20  # x86-64 transparent huge page size
_MADV_HUGEPAGE = 14
MiB = 1 << 20
#: Environment variable capping the page-locked bytes of one process (an integer, in bytes).
PINNED_LIMIT_ENV = "CKPTIO_PINNED_LIMIT_BYTES"


# -- host memory ---------------------------------------------------------------------------------
def host_bytes(nbytes: int) -> torch.Tensor:
    """Uninitialised host bytes on whole pages of their own (the length is rounded up to a page).

    Own pages matter for pinning: registering a range that shares a page with another registered
    allocation fails. Large regions are 2 MiB-aligned and advised to use transparent huge pages,
    because the first copy into fresh memory is bound by page faults (about 1.5 GB/s with 4 KiB
    pages on a VM, several times faster with 2 MiB pages) and huge pages also cut TLB misses.
    """
    span = -(-max(nbytes, 1) // PAGE) * PAGE
    align = HUGE if span >= 4 * HUGE and sys.platform.startswith("linux") else PAGE
    raw = torch.empty(span + align, dtype=torch.uint8)
    start = (-raw.data_ptr()) % align
    region = raw[start : start + span]
    if align == HUGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(
                ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(span - span % HUGE), _MADV_HUGEPAGE
            )
        except (OSError, AttributeError):  # advice only; plain pages work too
            pass
    return region


class PinBudget:
    """A cap on page-locked bytes, and the single warning given when pinning is not possible.

    Pinned memory cannot be swapped or reclaimed, so an unbounded amount can take the host down.
    Past the cap, or when pinning fails, buffers stay pageable: copies are then slower and
    synchronous, but still correct. One warning per budget says so (not one per tensor).
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"pinned limit {limit_bytes!r}: must be >= 0")
        self.limit = limit_bytes
        self.used = 0
        self.warned = False
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def warn_once(self, message: str) -> None:
        with self._lock:
            if self.warned:
                return
            self.warned = True
        warnings.warn(f"ckptio: {message}; using pageable host memory (slower copies)", RuntimeWarning, 3)


_default_budget: PinBudget | None = None


def default_budget() -> PinBudget:
    """The process-wide budget: ``$CKPTIO_PINNED_LIMIT_BYTES``, else half the physical memory
    shared among ``$LOCAL_WORLD_SIZE`` processes (each rank on a node pins its own shard)."""
    global _default_budget
    if _default_budget is None:
        env = os.environ.get(PINNED_LIMIT_ENV)
        if env is not None:
            limit = int(env)
        else:
            try:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                ram = 16 << 30
            limit = ram // 2 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        _default_budget = PinBudget(limit)
    return _default_budget


def alloc_host(
    nbytes: int, device: Device, budget: PinBudget, pin: bool
) -> tuple[torch.Tensor, Callable[[], Any] | None]:
    """``nbytes`` of host memory (uint8), pinned through ``device`` when ``pin`` and the budget allow.

    Returns the bytes and, when pinned, a release handle: calling it unpins and returns the bytes
    to the budget (once; later calls do nothing). It also runs by itself when the memory is freed,
    so registered memory is never returned to the allocator still registered.
    """
    region = host_bytes(nbytes)
    if not pin:
        return region[:nbytes], None
    span = region.numel()
    if not budget.take(span):
        budget.warn_once(
            f"the pinned-memory limit ({budget.limit / 1e9:.2f} GB, ${PINNED_LIMIT_ENV}) is reached"
        )
        return region[:nbytes], None
    try:
        device.pin(region)
    except Exception as exc:
        budget.give(span)
        budget.warn_once(f"could not page-lock host memory ({exc})")
        return region[:nbytes], None
    release = weakref.finalize(region.untyped_storage(), _unpin, device, region.data_ptr(), budget, span)
    release.atexit = False  # at exit the process memory goes anyway; the CUDA context may be gone
    return region[:nbytes], release


def _unpin(device: Device, ptr: int, budget: PinBudget, span: int) -> None:
    try:
        device.unpin(ptr)
    except Exception:  # runs from garbage collection, possibly at shutdown: nothing to raise to
        pass
    finally:
        budget.give(span)


# -- devices -------------------------------------------------------------------------------------
class Fence(Protocol):
    def wait(self) -> None: ...


class _Done:
    def wait(self) -> None:
        pass


DONE: Fence = _Done()


class Device:
    """The host: synchronous copies, nothing to pin. Correct for any pair of tensors.

    CPU-only builds use it; so does an accelerator ckptio has no streams for (the copies are
    then synchronous). Tests subclass it to stand in for an accelerator.
    """

    #: whether copies gain from pinned host memory (DMA, asynchronous copies)
    pins = False

    def is_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in this device's memory, so staging it crosses the bus."""
        return False

    def start(self) -> None:
        """Order the copies enqueued next after the work already queued by the caller's thread."""

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst``; may return before the copy is done (see :meth:`fence`)."""
        dst.copy_(src)

    def fence(self) -> Fence:
        """A fence whose ``wait()`` returns once every copy enqueued so far is done."""
        return DONE

    def synchronize(self) -> None:
        """Wait for every copy enqueued so far."""

    def pin(self, region: torch.Tensor) -> None:
        """Page-lock the memory of a contiguous host tensor; raise when that is impossible."""
        raise RuntimeError("no accelerator to page-lock memory for")

    def unpin(self, ptr: int) -> None:
        """Undo :meth:`pin` for the region starting at ``ptr``."""

    def is_pinned(self, t: torch.Tensor) -> bool:
        return False


class _Events:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def wait(self) -> None:
        for ev in self.events:
            ev.synchronize()


_pinner: ThreadPoolExecutor | None = None
_pinner_lock = threading.Lock()
_on_pinner = threading.local()


def _on_pin_thread(fn: Callable[[], Any]) -> Any:
    """Run a CUDA host (un)registration on a dedicated thread.

    A failed ``cudaHostRegister`` stays recorded as its thread's last CUDA error, and torch's
    next kernel-launch check on that thread would report it as if the kernel had failed. Doing
    the (rare) registrations on a thread of their own keeps the training thread's state clean.
    Unpinning can run from garbage collection on that very thread: it then runs in place.
    """
    global _pinner
    if getattr(_on_pinner, "active", False):
        return fn()
    with _pinner_lock:
        if _pinner is None:
            _pinner = ThreadPoolExecutor(
                1, "ckptio-pin", initializer=lambda: setattr(_on_pinner, "active", True)
            )
    return _pinner.submit(fn).result()


class CudaDevice(Device):
    """CUDA: ``cudaHostRegister`` for pinning, one side stream per GPU, events as fences.

    Registering memory we allocated (rather than ``torch.empty(pin_memory=True)``) keeps the
    huge-page layout and the exact size: torch's caching host allocator rounds each block up to a
    power of two and keeps freed blocks pinned, which defeats a cap on pinned bytes.
    """

    pins = True

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._ordered: set[int] = set()

    def is_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def start(self) -> None:
        self._ordered.clear()

    def _stream(self, dev: torch.device) -> torch.cuda.Stream:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        stream = self._streams.get(idx)
        if stream is None:
            stream = self._streams[idx] = torch.cuda.Stream(device=idx)
        if idx not in self._ordered:
            # the tensors were produced (or allocated) by work on the caller's current stream
            stream.wait_stream(torch.cuda.current_stream(idx))
            self._ordered.add(idx)
        return stream

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        gpu = src.device if src.device.type == "cuda" else dst.device
        if gpu.type != "cuda":
            dst.copy_(src)
            return
        with torch.cuda.stream(self._stream(gpu)):
            dst.copy_(src, non_blocking=True)

    def fence(self) -> Fence:
        events = []
        for idx in self._ordered:
            ev = torch.cuda.Event()
            ev.record(self._streams[idx])
            events.append(ev)
        return _Events(events)

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()

    def pin(self, region: torch.Tensor) -> None:
        ptr, nbytes = region.data_ptr(), region.numel() * region.element_size()
        gpu = torch.cuda.current_device()

        def register() -> int:
            torch.cuda.set_device(gpu)  # else the helper thread would open a context on GPU 0
            # flag 1 = cudaHostRegisterPortable: pinned for every CUDA context, as DCP does
            return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))

        rc = _on_pin_thread(register)
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {rc}")

    def unpin(self, ptr: int) -> None:
        _on_pin_thread(lambda: torch.cuda.cudart().cudaHostUnregister(ptr))

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.is_pinned()


def as_device(device: Device | torch.device | str | None = None) -> Device:
    """A :class:`Device` for ``device``; ``None`` means CUDA when available, else the host."""
    if isinstance(device, Device):
        return device
    if device is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    return CudaDevice() if kind == "cuda" and torch.cuda.is_available() else Device()


# -- loading -------------------------------------------------------------------------------------
ReadFn = Callable[[int, memoryview], None]


class DeviceWriter:
    """Fills device tensors from a byte source through a few fixed, pinned bounce buffers.

    For each ``bounce_bytes`` window of the destination, ``read_fn`` fills one bounce buffer,
    then a host-to-device copy from it is enqueued and the next window is read into the next
    buffer while that copy runs. A buffer is refilled only after its previous copy's fence, so
    with two buffers reads and copies overlap and the host never holds more than
    ``buffers * bounce_bytes`` of the checkpoint. With a ``read_pool`` the ``piece_bytes`` pieces
    of one window are read in parallel (the native format checksums 16 MiB blocks, so pieces
    of that size are each verified while hot in cache).

    Not thread-safe. Copies may still be in flight when :meth:`copy_into` returns: the
    destinations are complete after :meth:`synchronize` or :meth:`close` (also on ``with`` exit).
    """

    def __init__(
        self,
        device: Device | torch.device | str | None = None,
        bounce_bytes: int = 64 * MiB,
        *,
        buffers: int = 2,
        piece_bytes: int = 16 * MiB,
        read_pool: Executor | None = None,
        budget: PinBudget | None = None,
    ) -> None:
        if bounce_bytes <= 0 or piece_bytes <= 0 or bounce_bytes % piece_bytes or buffers < 1:
            raise ValueError("bounce_bytes must be a positive multiple of piece_bytes, buffers >= 1")
        self.device = as_device(device)
        self.bounce_bytes = bounce_bytes
        self.piece_bytes = piece_bytes
        self.read_pool = read_pool
        budget = budget or default_budget()
        allocated = [alloc_host(bounce_bytes, self.device, budget, self.device.pins) for _ in range(buffers)]
        self._bufs = [b for b, _ in allocated]
        self._releases = [r for _, r in allocated if r is not None]
        self._fences: list[Fence] = [DONE] * buffers
        self._turn = 0
        self.bytes_copied = 0

    @property
    def pinned(self) -> int:
        """How many bounce buffers are page-locked."""
        return len(self._releases)

    def copy_into(self, dst: torch.Tensor, read_fn: ReadFn) -> None:
        """Enqueue the filling of contiguous ``dst``; ``read_fn(offset, view)`` must fill ``view``
        with the destination's bytes starting at byte ``offset`` (a multiple of ``piece_bytes``)."""
        if not dst.is_contiguous():
            raise ValueError("DeviceWriter.copy_into needs a contiguous destination")
        nbytes = dst.numel() * dst.element_size()
        if nbytes == 0:
            return
        flat = dst.reshape(-1).view(torch.uint8)
        self.device.start()
        for off in range(0, nbytes, self.bounce_bytes):
            n = min(self.bounce_bytes, nbytes - off)
            i = self._turn
            self._turn = (i + 1) % len(self._bufs)
            self._fences[i].wait()  # the copy that last read buffer i is done
            host = self._bufs[i][:n]
            self._fill(host, off, read_fn)
            self.device.copy_async(flat[off : off + n], host)
            self._fences[i] = self.device.fence()
        self.bytes_copied += nbytes

    def _fill(self, host: torch.Tensor, off: int, read_fn: ReadFn) -> None:
        view = tensor_memoryview(host)
        pieces = [(off + j, view[j : j + self.piece_bytes]) for j in range(0, len(view), self.piece_bytes)]
        if self.read_pool is None or len(pieces) == 1:
            for o, piece in pieces:
                read_fn(o, piece)
            return
        futures = [self.read_pool.submit(read_fn, o, piece) for o, piece in pieces]
        for f in futures:  # wait for all before raising: no read may still write into the buffer
            f.exception()
        for f in futures:
            f.result()

    def synchronize(self) -> None:
        """Wait until every destination passed so far holds its bytes."""
        self.device.synchronize()
        self._fences = [DONE] * len(self._bufs)

    def close(self) -> None:
        """Synchronise, then unpin the bounce buffers."""
        try:
            self.synchronize()
        finally:
            for release in self._releases:
                release()
            self._releases = []

    def __enter__(self) -> DeviceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "DONE",
    "CudaDevice",
    "Device",
    "DeviceWriter",
    "Fence",
    "PinBudget",
    "alloc_host",
    "as_device",
    "default_budget",
    "host_bytes",
]
