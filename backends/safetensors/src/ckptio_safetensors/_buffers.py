"""Reading part of a stored tensor: only the rows a destination needs."""

from __future__ import annotations

import math

import torch
from ckptio.ext import Backend, tensor_memoryview


def band_read(
    backend: Backend,
    fpath: str,
    pos: int,
    dtype: torch.dtype,
    sizes: tuple[int, ...],
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
) -> tuple[torch.Tensor, int]:
    """The region ``offsets``/``lengths`` of a row-major tensor stored at ``pos``.

    Rows ``[offsets[0], offsets[0] + lengths[0])`` are contiguous on disk, so one ranged read
    fetches exactly them; the other dimensions are narrowed in memory. Returns the region (a
    view of a temporary) and the number of bytes read.
    """
    row = math.prod(sizes[1:]) * dtype.itemsize
    band = torch.empty((lengths[0], *sizes[1:]), dtype=dtype)
    if band.numel():
        backend.read_into(fpath, pos + offsets[0] * row, tensor_memoryview(band))
    src = band
    for dim in range(1, len(sizes)):
        src = src.narrow(dim, offsets[dim], lengths[dim])
    return src, lengths[0] * row
