"""Zero-copy byte views of CPU tensors (no numpy needed)."""

from __future__ import annotations

import ctypes

import torch


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory.

    The view does not own the memory: keep ``t`` alive while it is used.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def as_cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, contiguous, without conjugate/negative bits (copies only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()
