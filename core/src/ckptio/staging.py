"""Host staging for asynchronous saves: copy the state once into reusable buffers.

``CheckpointManager(async_save=True).save()`` returns as soon as this copy is done; the write
then runs from the staged copy, so training may change its tensors right away. Buffers are kept
between saves and reused when the layout matches, which is the whole cost of a second save's
blocking part: one copy per tensor, no allocation, no page faults.

Accelerator tensors (plain or DTensor shards) are staged into page-locked buffers with
asynchronous device-to-host copies, all enqueued on a side stream before one wait, so the copies
run back to back on the DMA engine while the host copies CPU tensors. The device-specific parts
go through :mod:`ckptio._device`, which CPU tests replace with recording or failing subclasses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ._device import HUGE, Device, PinBudget, alloc_host, as_device, default_budget, host_bytes


def huge_page_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on transparent huge pages when large (see ``host_bytes``)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 4 * HUGE:
        return torch.empty(shape, dtype=dtype)
    return host_bytes(nbytes)[:nbytes].view(dtype).view(shape)


Layout = tuple[torch.Size, torch.dtype, tuple[int, ...]]


@dataclass
class _Slot:
    layout: Layout
    buf: torch.Tensor
    release: Callable[[], Any] | None  # unpins; None when the buffer is pageable


class HostStager:
    """Copies nested state into host buffers that survive from one save to the next.

    A buffer is reused only for a tensor with the same name *and* layout (shape, dtype, stride):
    with uneven sharding a name can change shape between saves, and a buffer cached on the name
    alone once gave a corrupted resume (torchtitan#1136). CPU tensors are copied too, never
    referenced, or the background write would see later updates (pytorch#144657).

    :param device: the accelerator (default: CUDA when available, else the host alone).
    :param pinned_limit_bytes: cap on this stager's page-locked bytes (default: the process-wide
        cap of :func:`ckptio._device.default_budget`). Past it, buffers stay pageable.
    :param budget: a cap shared with other stagers (e.g. a manager's ``max_in_flight`` slots).
    """

    def __init__(
        self,
        *,
        device: Device | None = None,
        pinned_limit_bytes: int | None = None,
        budget: PinBudget | None = None,
    ) -> None:
        self.device = as_device(device)
        if pinned_limit_bytes is not None:
            budget = PinBudget(pinned_limit_bytes)
        self.budget: PinBudget = budget or default_budget()
        self._slots: dict[str, _Slot] = {}
        self.bytes_staged = 0

    @property
    def _buffers(self) -> dict[str, torch.Tensor]:
        """The current buffers by name (for tests and benchmarks)."""
        return {k: s.buf for k, s in self._slots.items()}

    @property
    def pinned_bytes(self) -> int:
        return sum(s.buf.numel() * s.buf.element_size() for s in self._slots.values() if s.release)

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key)
        if slot.release is not None:
            slot.release()  # unpinned now, so the budget is free for the next buffer

    def _buffer(self, key: str, src: torch.Tensor) -> torch.Tensor:
        layout: Layout = (src.shape, src.dtype, tuple(src.stride()))
        slot = self._slots.get(key)
        if slot is not None and slot.layout == layout:
            return slot.buf
        if slot is not None:
            self._drop(key)
        release = None
        if self.device.pins and self.device.is_device(src):
            nbytes = src.numel() * src.element_size()
            raw, release = alloc_host(nbytes, self.device, self.budget, pin=True)
            buf = raw.view(src.dtype).view(src.shape)
        else:  # host-to-host copies gain nothing from pinning
            buf = huge_page_empty(src.shape, src.dtype)
        self._slots[key] = _Slot(layout, buf, release)
        return buf

    def _stage(
        self, value: Any, key: str, seen: set[str], copies: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        if isinstance(value, DTensor):
            local = value.to_local()
            buf = self._buffer(key, local)
            copies.append((buf, local.detach()))
            seen.add(key)
            # not DTensor.from_local: it moves the local tensor to the mesh's device, which would
            # copy the staged shard straight back to the GPU; the spec (mesh, placements, global
            # shape) is all the planner reads, so the host buffer keeps the original's spec
            return DTensor(buf, value._spec, requires_grad=False)  # type: ignore[call-arg]
        if isinstance(value, torch.Tensor):
            buf = self._buffer(key, value)
            copies.append((buf, value.detach()))
            seen.add(key)
            return buf
        if isinstance(value, dict):
            return {k: self._stage(v, f"{key}.{k}", seen, copies) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list)) for v in value):
            staged = [self._stage(v, f"{key}.{i}", seen, copies) for i, v in enumerate(value)]
            return type(value)(staged) if isinstance(value, tuple) else staged
        return copy.deepcopy(value)

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` whose tensors live in this stager's buffers.

        Returns only once every copy is complete, so the caller may change its tensors at once.
        """
        seen: set[str] = set()
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = {k: self._stage(v, k, seen, copies) for k, v in state.items()}
        dev = self.device
        on_device = [dev.is_device(src) for _, src in copies]
        # device copies first: they run on the side stream while the host copies CPU tensors
        dev.start()
        try:
            for (buf, src), d in zip(copies, on_device):
                if d:
                    dev.copy_async(buf, src)
            for (buf, src), d in zip(copies, on_device):
                if not d:
                    buf.copy_(src)
        finally:  # also on error: no copy may still be writing into a buffer we hand out again
            dev.synchronize()
        self.bytes_staged = sum(buf.numel() * buf.element_size() for buf, _ in copies)
        for stale in set(self._slots) - seen:
            self._drop(stale)
        return out

    def close(self) -> None:
        """Drop every buffer (and unpin it) now, rather than when the stager is collected."""
        for key in list(self._slots):
            self._drop(key)
