"""The safetensors container, written and parsed by hand so that writes stream.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``. The header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the start of
the data) plus an optional ``"__metadata__"`` object of string values. The JSON is padded with spaces
so that the data starts 8-byte aligned, and the data regions must tile the data section exactly.

Because every size is known from shapes and dtypes before a single byte is written, the header can
be written first and the tensors streamed after it one by one: no file is ever built in memory
(torch's ``HuggingFaceStorageWriter`` builds each file as one ``bytes`` object, about 2x the data).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import xxhash
from ckptio.errors import CorruptCheckpointError, StateMismatchError
from ckptio.ext import Backend, as_cpu_contiguous, tensor_memoryview

#: safetensors dtype codes for every torch dtype both sides support.
DTYPE_TO_CODE: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}
CODE_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_CODE.items()}

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_NDIM = 64  # as ckptio's native metadata
ALIGN = 8


def dtype_code(dtype: torch.dtype, name: str = "?") -> str:
    code = DTYPE_TO_CODE.get(dtype)
    if code is None:
        raise StateMismatchError(
            f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
            "convert it or save in the native format"
        )
    return code


@dataclass
class HeaderEntry:
    """One tensor of a safetensors file: its name, dtype, shape and byte range in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def nbytes_of(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def layout(items: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[HeaderEntry]:
    """Place tensors in the data section, largest element size first (then by name) as the
    official writer does, so that each tensor is aligned to its element size for zero-copy mmap."""
    order = sorted(items, key=lambda it: (-it[1].itemsize, it[0]))
    pos = 0
    out = []
    for name, dtype, shape in order:
        n = nbytes_of(dtype, shape)
        out.append(HeaderEntry(name, dtype, tuple(int(s) for s in shape), pos, pos + n))
        pos += n
    return out


def encode_header(entries: list[HeaderEntry], metadata: dict[str, str] | None = None) -> bytes:
    """``<u64 N><JSON padded with spaces to 8-byte alignment>`` for ``entries``."""
    body: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors __metadata__ values must be strings")
        body["__metadata__"] = metadata
    for e in entries:
        if e.name == "__metadata__":
            raise StateMismatchError("a tensor cannot be named '__metadata__' in a safetensors file")
        body[e.name] = {
            "dtype": dtype_code(e.dtype, e.name),
            "shape": list(e.shape),
            "data_offsets": [e.begin, e.end],
        }
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGN)
    return struct.pack("<Q", len(text)) + text


def data_start(header: bytes) -> int:
    """Offset of the data section in a file whose encoded header is ``header``."""
    return len(header)


def stream_tensors(
    f: BinaryIO,
    header: bytes,
    entries: list[HeaderEntry],
    get_tensor: Callable[[HeaderEntry], torch.Tensor],
    checksums: bool = True,
) -> dict[str, str]:
    """Write ``header`` then each entry's bytes in order; return ``{name: xxh3_64 hex}``.

    ``get_tensor`` is called once per entry just before its bytes are written, so only one tensor
    (the one being written) needs to be materialised at a time.
    """
    f.write(header)
    digests: dict[str, str] = {}
    for e in entries:
        t = as_cpu_contiguous(get_tensor(e))
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise StateMismatchError(
                f"tensor {e.name!r} changed while saving: planned {e.dtype}{list(e.shape)}, got {t.dtype}{list(t.shape)}"
            )
        buf = tensor_memoryview(t)
        if len(buf) != e.nbytes:  # pragma: no cover - guarded by the shape check
            raise StateMismatchError(f"tensor {e.name!r} has {len(buf)} bytes, planned {e.nbytes}")
        if len(buf):
            f.write(buf)
        if checksums:
            digests[e.name] = xxhash.xxh3_64_hexdigest(buf)
        del buf, t
    return digests


@dataclass
class ParsedHeader:
    """A parsed safetensors header: entries by name, ``__metadata__``, and where data starts."""

    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int


def parse_header(raw: bytes, where: str, file_size: int | None = None) -> ParsedHeader:
    """Parse and check a header (``raw`` starts with the 8-byte length and holds the whole JSON)."""
    if len(raw) < 8:
        raise CorruptCheckpointError(f"{where}: too short to be a safetensors file", path=where)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or len(raw) < 8 + n:
        raise CorruptCheckpointError(f"{where}: bad safetensors header length {n}", path=where)
    try:
        body = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(
            f"{where}: safetensors header is not valid JSON ({exc})", path=where
        ) from exc
    if not isinstance(body, dict):
        raise CorruptCheckpointError(f"{where}: safetensors header is not a JSON object", path=where)
    meta = body.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings", path=where)
    entries: dict[str, HeaderEntry] = {}
    end_max = 0
    for name, info in body.items():
        try:
            dtype = CODE_TO_DTYPE[info["dtype"]]
            if type(info["shape"]) is not list or len(info["shape"]) > MAX_NDIM:
                raise TypeError(f"shape must be a list of at most {MAX_NDIM} sizes")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(type(x) is int and 0 <= x < 1 << 62 for x in (*shape, begin, end)):
                raise TypeError("negative, absurd or non-integer size")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{where}: bad header entry for {name!r} ({exc})", path=where
            ) from exc
        if end - begin != nbytes_of(dtype, shape):
            raise CorruptCheckpointError(
                f"{where}: {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {nbytes_of(dtype, shape)}",
                path=where,
            )
        entries[name] = HeaderEntry(name, dtype, shape, begin, end)
        end_max = max(end_max, end)
    start = 8 + n
    if file_size is not None and start + end_max > file_size:
        raise CorruptCheckpointError(
            f"{where} is truncated: data needs {start + end_max} bytes, the file has {file_size}", path=where
        )
    return ParsedHeader(entries, {str(k): v for k, v in meta.items()}, start)


def read_header(backend: Backend, path: str) -> ParsedHeader:
    """Read just the header of a safetensors file through the backend (two small ranged reads)."""
    where = backend.url(path)
    size = backend.size(path)
    first = backend.read_bytes(path, 0, 8)
    if len(first) < 8:
        raise CorruptCheckpointError(f"{where}: too short to be a safetensors file", path=where)
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CorruptCheckpointError(f"{where}: bad safetensors header length {n}", path=where)
    return parse_header(first + backend.read_bytes(path, 8, n), where, size)
