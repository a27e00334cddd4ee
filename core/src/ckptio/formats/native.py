"""The native format: DCP planning, raw tensor bytes, JSON metadata.

Layout of a checkpoint directory::

    manifest.json          commit record (written last by the core), holds the metadata below
    __<rank>_<k>.bin       raw little-endian bytes of the tensors (chunks) one rank wrote,
                           back to back; ``k`` is the writer thread

The metadata is DCP's ``Metadata`` in JSON (tensors: dtype, global size, chunks; per chunk: file,
offset, length, xxh3-64 checksum). It is not a pickle, so loading a checkpoint cannot run code, and
every number in it is checked before use (:func:`metadata_from_json`): chunks must tile their
tensor exactly, byte ranges must lie in files whose real sizes match the manifest, every chunk
must have its checksums (unless the caller loads with ``verify=False``), all in time linear in
the size of the metadata. Because the bytes are raw, a load reads each chunk
straight into the destination tensor (``preadv`` locally, ranged reads on object stores) with
no intermediate ``torch.load``; resharding falls back to a bounded temporary per chunk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import io
import math
import operator
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from .._buffers import as_cpu_contiguous, tensor_memoryview
from .._device import DeviceWriter
from .._threads import resolve_thread_count
from ..backend import Backend
from ..errors import CorruptCheckpointError
from ..hookspecs import hookimpl
from ..manifest import MAX_ENTRIES, Manifest, check_file_name, no_gc
from ..progress import Progress
from ..serialization import MAX_BYTES, dtype_name, parse_dtype
from .base import (
    FileSizeChecker,
    Format,
    FormatReader,
    FormatWriter,
    TensorEntry,
    is_first_rank,
    missing_file,
    tensor_entries,
)

#: Writer threads per rank by default: one per core available to each rank on this machine
#: (:func:`ckptio.ext.default_thread_count`), at most this many.
MAX_DEFAULT_WRITE_THREADS = 4
#: Reader threads per rank by default: two per core available to each rank (a thread waiting for
#: a cold disk leaves its core to another), at most this many.
MAX_DEFAULT_READ_THREADS = 8
READ_THREADS_PER_CORE = 2.0
#: Writes of a block go in pieces of this size, each hashed right before it is written, while it
#: is still in the CPU cache (a whole block is not: hashing it apart reads it from memory twice).
PIECE = 512 << 10
#: Local reads go in ``preadv`` calls of this size, each part (when verified) hashed as soon as it
#: lands, while in the last-level cache. Fewer, larger calls cost less CPU than parts that fit in
#: L2; on a cold disk, calls of a whole block (16 MiB) each wait for all their I/O, while the
#: kernel's readahead keeps ahead of 1 MiB calls (measured: 10-20% faster cold loads).
READ_PIECE = 1 << 20
#: Checksums cover blocks of this size, so big tensors are read and verified in parallel pieces,
#: each hashed while it is still in the CPU cache.
BLOCK = 16 << 20
#: On a local file system, while DCP plans a load, the kernel is asked to start reading this many
#: bytes at the start of each reader thread's share (``posix_fadvise(WILLNEED)``), so a cold disk
#: is busy before the first read is issued (see :meth:`NativeReader.bind_state`).
PREFETCH = 2 * BLOCK
_MAX_DIM = 1 << 62
_INT = {int}
_STR = {str}
#: Bounds on what a manifest may describe (see :func:`metadata_from_json`).
MAX_NDIM = 64
MAX_PATH_DEPTH = 64
MAX_PATH_INDEX = 1 << 20


@dataclass(frozen=True, kw_only=True)
class NativeSaveOptions:
    """The native format's options on ``save`` (and a manager's saves)."""

    thread_count: int | None = None
    """Writer threads per rank; each writes its own file (``__<rank>_<k>.bin``). Default (``None``):
    one per core available to each rank on this machine, at most 4."""


@dataclass(frozen=True, kw_only=True)
class NativeLoadOptions:
    """The native format's options on ``load``."""

    thread_count: int | None = None
    """Reader threads per rank (file sizes are checked on four times as many). Default (``None``):
    two per core available to each rank on this machine, at most 8."""


@dataclass(slots=True)  # not frozen: its __init__ would cost ~1 us per chunk (32k-chunk tensors)
class _Entry:
    fqn: str
    offsets: tuple[int, ...] | None  # chunk offsets (None for byte items)
    sizes: tuple[int, ...] | None
    dtype: torch.dtype | None
    file: str
    pos: int
    length: int
    xxh3: tuple[str, ...] | None  # one xxh3-64 per BLOCK bytes

    def blocks(self) -> range:
        return range(max(1, -(-self.length // BLOCK)))


def _hash(buf: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(buf)


def _parse_hashes(value: Any, length: int, where: str, fqn: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    hashes = (value,) if type(value) is str else value
    if (
        type(hashes) not in (list, tuple)
        or len(hashes) != max(1, -(-length // BLOCK))
        or set(map(type, hashes)) != _STR
    ):
        raise CorruptCheckpointError(f"{where}: bad checksum list for {fqn!r}")
    return tuple(hashes)


# -- writer --------------------------------------------------------------------------------
class NativeWriter(FormatWriter):
    """Writes each rank's items into ``thread_count`` files, one writer thread per file."""

    def write_items(self, items: list[WriteItem], planner: SavePlanner, prefix: str) -> list[WriteResult]:
        n_threads = resolve_thread_count(
            getattr(self.options, "thread_count", None), MAX_DEFAULT_WRITE_THREADS
        )
        buckets = split_by_size(items, n_threads)
        names = [self.file_name(f"{prefix}_{k}.bin") for k in range(len(buckets))]
        total = sum(_item_size(it) for it in items)
        self._bar = Progress(total, "ckptio save", enable=self.progress, delay=2.0)
        try:
            if len(buckets) <= 1:
                return [r for b, n in zip(buckets, names) for r in self._write_file(n, b, planner)]
            with ThreadPoolExecutor(len(buckets), thread_name_prefix="ckptio-write") as pool:
                futures = [pool.submit(self._write_file, n, b, planner) for b, n in zip(buckets, names)]
                return [r for f in futures for r in f.result()]
        finally:
            self._bar.close()

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results: list[WriteResult] = []
        pos = 0
        with self.backend.open_write(self.backend.join(self.path, name)) as f:
            for item in items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    buf: memoryview | bytes = data.getvalue()
                    info: dict[str, Any] = {"kind": "bytes"}
                else:
                    assert isinstance(data, torch.Tensor)
                    t = as_cpu_contiguous(data)
                    buf = tensor_memoryview(t)
                    info = {"kind": "tensor"}
                mv = memoryview(buf)
                hashes = []
                for off in range(0, max(1, len(mv)), BLOCK):
                    block = mv[off : off + BLOCK]
                    h = xxhash.xxh3_64()
                    for p in range(0, len(block), PIECE):  # each piece hashed while in cache
                        piece = block[p : p + PIECE]
                        h.update(piece)
                        f.write(piece)
                    hashes.append(h.hexdigest())
                    self._bar.update(len(block))
                info.update(file=name, pos=pos, length=len(buf), xxh3=hashes)
                results.append(WriteResult(index=item.index, size_in_bytes=len(buf), storage_data=info))
                pos += len(buf)
        if results:
            results[-1].storage_data["file_size"] = pos
        return results

    def build_metadata(
        self, metadata: Metadata, results: list[WriteResult]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        files: dict[str, dict[str, Any]] = {}
        storage = []
        for r in results:
            sd = r.storage_data
            if "file_size" in sd:
                files[sd["file"]] = {"size": sd["file_size"]}
            storage.append(
                {
                    "fqn": r.index.fqn,
                    "offsets": list(r.index.offset) if r.index.offset is not None else None,
                    "file": sd["file"],
                    "pos": sd["pos"],
                    "length": sd["length"],
                    "xxh3": sd["xxh3"],
                }
            )
        return {"dcp": metadata_to_json(metadata), "storage": storage}, files


def _item_size(it: WriteItem) -> int:
    if it.tensor_data is None:
        return 0
    return math.prod(it.tensor_data.size) * it.tensor_data.properties.dtype.itemsize


def split_by_size(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
    """Greedy balance of items over ``n`` files by byte size (largest first)."""
    size = _item_size

    buckets: list[list[WriteItem]] = [[] for _ in range(n)]
    loads = [0] * n
    for it in sorted(items, key=size, reverse=True):
        k = loads.index(min(loads))
        buckets[k].append(it)
        loads[k] += size(it)
    return [b for b in buckets if b]


# -- metadata <-> JSON -----------------------------------------------------------------------
def metadata_to_json(md: Metadata) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            tensors[fqn] = {
                "dtype": dtype_name(m.properties.dtype, fqn),
                "size": list(m.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks],
            }
        else:
            tensors[fqn] = None  # a JSON value stored as bytes
    planner_data = None
    if isinstance(md.planner_data, dict):
        planner_data = {k: list(v) for k, v in md.planner_data.items()}
    return {"state": tensors, "planner_data": planner_data, "version": md.version}


def _int_list(x: Any, where: str, fqn: str = "", what: str = "") -> tuple[int, ...]:
    # map/min/max run in C: this is called three times per chunk (32k-chunk tensors exist), so
    # the message is only formatted on failure
    if (
        type(x) is not list
        or len(x) > MAX_NDIM
        or (x and (set(map(type, x)) != _INT or min(x) < 0 or max(x) > _MAX_DIM))
    ):
        at = f"{where}: {fqn} {what}" if what else where
        raise CorruptCheckpointError(
            f"{at}: expected at most {MAX_NDIM} integers in [0, 2**62], got {x!r:.200}"
        )
    return tuple(x)


def metadata_from_json(
    fm: dict[str, Any], files: dict[str, dict[str, Any]], where: str, *, require_checksums: bool = True
) -> tuple[Metadata, dict]:
    """Rebuild DCP ``Metadata`` and the chunk table, checking every number against the files.

    What is checked, in time linear in the size of the metadata (up to a sort):

    * every tensor has a known dtype, at most :data:`MAX_NDIM` dims and at most 2**62 bytes;
    * its chunks lie inside it and tile it exactly (no overlap, no gap), for any number of chunks;
    * every chunk and value has exactly one storage entry whose length matches its shape and
      dtype, inside a file the manifest lists (names cannot leave the checkpoint), with its
      checksums (unless ``require_checksums`` is false: ``verify=False`` loads, ``inspect``);
    * ``planner_data`` paths are what DCP writes: for each key, a short list of names and small
      list indices that joined with dots give the key, consistent with each other.

    Declared file sizes are compared with the real files by the readers
    (:class:`~ckptio.formats.base.FileSizeChecker`), before anything is read.
    Anything a hostile manifest slips past these checks with the wrong JSON type still ends as a
    :class:`CorruptCheckpointError`.
    """
    try:
        with no_gc():
            return _metadata_from_json(fm, files, where, require_checksums)
    except CorruptCheckpointError:
        raise
    except (
        TypeError,
        KeyError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CorruptCheckpointError(
            f"{where}: native metadata is malformed ({type(exc).__name__}: {exc})"
        ) from exc


def _metadata_from_json(
    fm: dict[str, Any], files: dict[str, dict[str, Any]], where: str, require_checksums: bool
) -> tuple[Metadata, dict]:
    try:
        dcp = fm["dcp"]
        state = dcp["state"]
        storage = fm["storage"]
        if not isinstance(state, dict) or not isinstance(storage, list):
            raise TypeError("state/storage")
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{where}: native metadata is malformed ({exc})") from exc
    if len(state) > MAX_ENTRIES or len(storage) > MAX_ENTRIES:
        raise CorruptCheckpointError(f"{where}: more than {MAX_ENTRIES} entries, refusing")
    sdm: dict[str, Any] = {}
    # per tensor: {chunk offsets: chunk sizes}, to match storage entries in O(1)
    chunk_sizes: dict[str, dict[tuple[int, ...], tuple[int, ...]]] = {}
    n_chunks = n_values = 0
    value = BytesStorageMetadata()  # field-less: one instance serves every value
    for fqn, t in state.items():
        if t is None:
            sdm[fqn] = value
            n_values += 1
            continue
        if not isinstance(t, dict) or type(t.get("chunks")) is not list:
            raise CorruptCheckpointError(f"{where}: bad entry for tensor {fqn!r}")
        dtype = parse_dtype(t.get("dtype", "?"))
        size = _int_list(t.get("size"), where, fqn, "size")
        ndim = len(size)
        total = math.prod(size)
        if total * dtype.itemsize > _MAX_DIM:
            raise CorruptCheckpointError(f"{where}: tensor {fqn!r}{list(size)} is absurdly large")
        n_chunks += len(t["chunks"])
        if n_chunks > MAX_ENTRIES:
            raise CorruptCheckpointError(f"{where}: more than {MAX_ENTRIES} chunks, refusing")
        boxes: dict[tuple[int, ...], tuple[int, ...]] = {}
        chunks = []
        covered = 0
        for c in t["chunks"]:
            if type(c) is not list or len(c) != 2:
                raise CorruptCheckpointError(f"{where}: bad chunk for {fqn!r}")
            off, sz = _int_list(c[0], where, fqn, "offsets"), _int_list(c[1], where, fqn, "sizes")
            if (
                len(off) != ndim
                or len(sz) != ndim
                or not all(map(operator.le, map(operator.add, off, sz), size))
            ):
                raise CorruptCheckpointError(
                    f"{where}: chunk {list(off)}+{list(sz)} is out of range for {fqn!r}{list(size)}"
                )
            if off in boxes:
                raise CorruptCheckpointError(f"{where}: two chunks of {fqn!r} start at {list(off)}")
            boxes[off] = sz
            covered += math.prod(sz)
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(sz)))
        if covered != total:
            raise CorruptCheckpointError(
                f"{where}: chunks of {fqn!r} hold {covered} elements, the tensor has {total} "
                "(they overlap or leave a gap)"
            )
        # one chunk holding all ``total`` elements inside the tensor is the whole tensor
        problem = tiling_problem(size, boxes.items()) if total and len(boxes) > 1 else None
        if problem:
            raise CorruptCheckpointError(f"{where}: chunks of {fqn!r} {problem}")
        chunk_sizes[fqn] = boxes
        sdm[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(size), chunks=chunks
        )
    entries: dict[tuple[str, tuple[int, ...] | None], _Entry] = {}
    good_files: dict[str, int] = {}  # name -> declared size, for names already checked
    for s in storage:
        try:
            fqn, file, pos, length, off_json = s["fqn"], s["file"], s["pos"], s["length"], s["offsets"]
            if type(pos) is not int or type(length) is not int or type(fqn) is not str:
                raise TypeError("fqn/pos/length")
            offsets = None if off_json is None else _int_list(off_json, where, fqn, "offsets")
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(f"{where}: malformed storage entry ({exc!r:.200})") from exc
        fsize = good_files.get(file)
        if fsize is None:
            fsize = _declared_file(file, files, where)
            good_files[file] = fsize
        m = sdm.get(fqn)
        if m is None:
            raise CorruptCheckpointError(f"{where}: storage entry for unknown tensor {fqn!r}")
        if pos < 0 or length < 0 or pos + length > fsize:
            raise CorruptCheckpointError(f"{where}: {fqn!r} lies outside {file!r} ({pos}+{length} > {fsize})")
        key = (fqn, offsets)
        if key in entries:
            raise CorruptCheckpointError(f"{where}: {fqn!r} at {offsets} is stored twice")
        h = s.get("xxh3")
        if type(h) is list and len(h) == 1 and type(h[0]) is str and length <= BLOCK:  # the usual case
            hashes: tuple[str, ...] | None = (h[0],)
        else:
            hashes = _parse_hashes(h, length, where, fqn)
        if hashes is None and require_checksums:
            raise CorruptCheckpointError(
                f"{where}: {fqn!r} has no checksum; a committed checkpoint always has them "
                "(load with verify=False to read it unchecked)"
            )
        if m is value:
            if offsets is not None:
                raise CorruptCheckpointError(f"{where}: value {fqn!r} has chunk offsets")
            if length > MAX_BYTES:
                raise CorruptCheckpointError(f"{where}: value {fqn!r} is {length} bytes, refusing")
            entries[key] = _Entry(fqn, None, None, None, file, pos, length, hashes)
        else:
            sizes = chunk_sizes[fqn].get(offsets) if offsets is not None else None
            if sizes is None:
                raise CorruptCheckpointError(f"{where}: {fqn!r} has no chunk at {offsets}")
            if length != math.prod(sizes) * m.properties.dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{where}: stored length of {fqn!r} does not match its shape and dtype"
                )
            entries[key] = _Entry(fqn, offsets, sizes, m.properties.dtype, file, pos, length, hashes)
    # every entry matched a distinct chunk or value: equal counts mean each one has its data
    if len(entries) != n_chunks + n_values:
        for fqn, m in sdm.items():
            keys = (
                [(fqn, off) for off in chunk_sizes[fqn]]
                if isinstance(m, TensorStorageMetadata)
                else [(fqn, None)]
            )
            if any(k not in entries for k in keys):
                raise CorruptCheckpointError(f"{where}: no stored data for {fqn!r}")
    planner_data = _planner_data(dcp.get("planner_data"), where)
    md = Metadata(state_dict_metadata=sdm, planner_data=planner_data, storage_data=entries)
    return md, entries


def _declared_file(name: Any, files: dict[str, dict[str, Any]], where: str) -> int:
    """The declared size of data file ``name``, which must be a listed, safe relative name."""
    if not isinstance(name, str):
        raise CorruptCheckpointError(f"{where}: malformed file name {name!r:.100}")
    check_file_name(name, where)
    info = files.get(name)
    size = info.get("size") if isinstance(info, dict) else None
    if info is None:
        raise CorruptCheckpointError(f"{where}: storage entry in unlisted file {name!r}")
    if type(size) is not int or size < 0:
        raise CorruptCheckpointError(f"{where}: bad size for {name!r}")
    return size


def _planner_data(pd: Any, where: str) -> dict[str, tuple[str | int, ...]] | None:
    """Check DCP's ``planner_data`` (flattened key -> object path) and return it as tuples.

    Each path is what DCP's ``flatten_state_dict`` writes: a non-empty list of at most
    :data:`MAX_PATH_DEPTH` dict keys (str, the first always) and list indices (int below
    :data:`MAX_PATH_INDEX`) whose dotted join is the key. The paths must also describe one
    consistent tree (no list that is also a dict, no value that is also a container), and the
    lists they imply hold at most a few slots per value, so that rebuilding the nested state
    (``set_element``, as ``ckptio cp --full`` does) allocates in proportion to the manifest.
    """
    if pd is None:
        return None
    if not isinstance(pd, dict) or len(pd) > MAX_ENTRIES:
        raise CorruptCheckpointError(f"{where}: planner_data is malformed")
    out: dict[str, tuple[str | int, ...]] = {}
    # A trie of the paths: (container node, component) -> child container node, or _LEAF. Each
    # container is a dict or a list (the type of its components), fixed when it is created.
    children: dict[tuple[int, str | int], int] = {}
    is_list: list[bool] = [False]  # node 0, the state itself, is a dict
    list_len: dict[int, int] = {}
    slots = 0
    for key, path in pd.items():
        if type(path) is not list or not path or len(path) > MAX_PATH_DEPTH or type(path[0]) is not str:
            raise CorruptCheckpointError(
                f"{where}: planner_data path for {key!r:.100} is malformed: {path!r:.200}"
            )
        if set(map(type, path)) == _STR:  # the usual case, names only
            ok = ".".join(path) == key
        else:
            ok = all(type(p) is str or (type(p) is int and 0 <= p < MAX_PATH_INDEX) for p in path) and (
                ".".join(map(str, path)) == key
            )
        if not ok:
            raise CorruptCheckpointError(
                f"{where}: planner_data path for {key!r:.100} is not a valid object path: {path!r:.200}"
            )
        node = 0
        last = len(path) - 1
        for i, comp in enumerate(path):
            if type(comp) is int:
                n = list_len.get(node, 0)
                if comp >= n:
                    slots += comp + 1 - n
                    list_len[node] = comp + 1
            child = children.get((node, comp))
            if i == last:
                if child is not None:  # a value twice, or a value that is also a container
                    raise CorruptCheckpointError(f"{where}: planner_data paths conflict at {key!r:.100}")
                children[(node, comp)] = _LEAF
                break
            nxt_list = type(path[i + 1]) is int
            if child is None:
                child = len(is_list)
                children[(node, comp)] = child
                is_list.append(nxt_list)
            elif child == _LEAF or is_list[child] != nxt_list:
                raise CorruptCheckpointError(f"{where}: planner_data paths conflict at {key!r:.100}")
            node = child
        out[key] = tuple(path)
    if slots > 4 * len(pd) + 1024:
        raise CorruptCheckpointError(
            f"{where}: planner_data implies lists of {slots} slots for {len(pd)} values, refusing"
        )
    return out


_LEAF = -1


class _TooIrregular(Exception):
    pass


def tiling_problem(
    size: tuple[int, ...], boxes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]
) -> str | None:
    """Why the ``(offsets, sizes)`` boxes do not tile a tensor of ``size`` exactly; ``None`` if they do.

    The boxes must already lie inside the tensor. Empty boxes are ignored. The check sweeps the
    first dimension: between two consecutive box edges the set of boxes crossing that slab is
    fixed, and must tile the slab's cross-section, checked the same way one dimension down; in
    the last dimension the crossing intervals, sorted, must follow each other from 0 to the end.
    A grid of chunks (what DCP writes for any placement) costs O(n log n) for n chunks. A layout
    so irregular that sweeping it would cost more than ``n * (4 * ndim + 64)`` box visits, with
    each dimension swept first in turn, is refused rather than checked slowly (DCP never
    writes one: all chunks of a tensor come from one placement on one device mesh).
    """
    nonempty = [(o, s) for o, s in boxes if all(s)]
    if not size:
        return None if len(nonempty) == 1 else "do not hold the scalar exactly once"
    if not nonempty or not math.prod(size):
        return None if not nonempty and not math.prod(size) else "overlap or leave a gap"
    if _is_grid(size, nonempty):
        return None
    for first in range(len(size)):  # the first dimension to sweep; each try has its own budget
        order = [first] + [d for d in range(len(size)) if d != first]
        permuted = [(tuple(o[d] for d in order), tuple(s[d] for d in order)) for o, s in nonempty]
        budget = [len(nonempty) * (4 * len(size) + 64) + 16]
        try:
            ok = _tiles(permuted, tuple(size[d] for d in order), 0, budget)
        except _TooIrregular:
            continue
        return None if ok else "overlap or leave a gap"
    return "are laid out too irregularly to check; refusing"


def _is_grid(size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether ``boxes`` are exactly the cells of one grid over ``size``: in every dimension the
    boxes' intervals cut ``[0, size)`` into consecutive pieces (a start always with the same
    length), the boxes start at distinct offsets, and there are as many boxes as cells. Each box
    is then one cell and each cell one box, so they tile the tensor. This is what DCP writes (a
    slab per rank for ``Shard``, a grid for 2-D meshes), checked in O(n * ndim); anything else is
    left to the sweep."""
    cells = 1
    for d in range(len(size)):
        pieces: dict[int, int] = {}
        for o, s in boxes:
            if pieces.setdefault(o[d], s[d]) != s[d]:
                return False
        end = 0
        for start in sorted(pieces):
            if start != end:
                return False
            end += pieces[start]
        if end != size[d]:
            return False
        cells *= len(pieces)
    return cells == len(boxes) and len({o for o, _ in boxes}) == len(boxes)


def _tiles(
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], size: tuple[int, ...], d: int, budget: list[int]
) -> bool:
    budget[0] -= len(boxes)
    if budget[0] < 0:
        raise _TooIrregular
    if d == len(size) - 1:
        pos = 0
        for start, length in sorted((o[d], s[d]) for o, s in boxes):
            if start != pos:
                return False
            pos += length
        return pos == size[d]
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for i, (o, s) in enumerate(boxes):
        starts.setdefault(o[d], []).append(i)
        ends.setdefault(o[d] + s[d], []).append(i)
    edges = sorted(starts.keys() | ends.keys())
    if edges[0] != 0 or edges[-1] != size[d]:
        return False
    active: dict[int, None] = {}
    for edge in edges[:-1]:
        for i in ends.get(edge, ()):
            del active[i]
        for i in starts.get(edge, ()):
            active[i] = None
        if not active or not _tiles([boxes[i] for i in active], size, d + 1, budget):
            return False
    return True


# -- reader --------------------------------------------------------------------------------
class NativeReader(FormatReader):
    """Reads chunks straight into destination tensors, in parallel, verifying checksums."""

    def __init__(
        self,
        backend: Backend,
        path: str,
        manifest: Manifest,
        options: NativeLoadOptions | None = None,
        *,
        verify: bool = True,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        options = options or NativeLoadOptions()
        self.backend = backend
        self.path = path
        self.manifest = manifest
        self.verify = bool(verify)
        self.thread_count = resolve_thread_count(
            options.thread_count, MAX_DEFAULT_READ_THREADS, per_core=READ_THREADS_PER_CORE
        )
        where = backend.url(path)
        self.metadata, self.entries = metadata_from_json(
            manifest.format_metadata, manifest.files, where, require_checksums=self.verify
        )
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._progress = progress
        self._bar = Progress(0, "", enable=False)
        self._files: _OpenFiles | None = None  # during ``read_data`` on local file systems
        self._prefetching: list[concurrent.futures.Future[None]] = []  # see ``bind_state``
        # Declared sizes are made true before anything sized from the metadata is allocated (by
        # one rank for all files; every rank checks the files it reads in ``read_data``).
        # Not in ``read_metadata``: DCP turns any error raised there into an AssertionError.
        # Locally a size is one ``lstat``: threads would cost more than they save.
        self._local = backend.local_path(path) is not None
        size_threads = 1 if self._local else 4 * self.thread_count
        self._sizes = FileSizeChecker(backend, path, manifest.files, threads=size_threads)
        if is_first_rank():
            self._sizes.check(e.file for e in self.entries.values())

    def bind_state(self, state: dict[str, Any], expanded: dict[str, Any]) -> None:
        """Called by ckptio with the state before DCP plans (which takes a few ms per hundred
        tensors): on a local file system, in a single-process load, ask the kernel to start
        reading the head of each reader thread's share of the chunks the state asks for
        (:data:`PREFETCH` bytes each), so a cold disk works while DCP plans. Only a hint: the
        files are opened as every read opens them (no links, regular files only), nothing is
        read into memory here, and any failure is ignored."""
        if not self._local or self.thread_count < 2 or not hasattr(os, "posix_fadvise"):
            return
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return  # each rank reads a part of the chunks: the plan says which
            wanted = _wanted_entries(self.entries.values(), expanded)
            spans = _share_heads(wanted, self.thread_count, PREFETCH, self.manifest.files)
            if not spans:
                return
            pool = _read_pool(self.thread_count)
            self._prefetching = [
                pool.submit(self._prefetch, self.backend.join(self.path, name), start, length)
                for name, start, length in spans
            ]
        except Exception:  # a hint: never a reason to fail a load
            return

    def _prefetch(self, fpath: str, start: int, length: int) -> None:
        with contextlib.suppress(Exception), self.backend.open_read(fpath) as f:
            os.posix_fadvise(f.fileno(), start, length, os.POSIX_FADV_WILLNEED)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        """Read every item; chunks that land whole in a contiguous destination are read straight
        into it, block by block in parallel (each block hashed while hot in cache); the rest
        (resharding, dtype or device changes) go through one temporary per chunk."""
        direct: list[tuple[ReadItem, torch.Tensor]] = []
        to_device: list[tuple[_Entry, torch.Tensor]] = []  # whole chunks into accelerator memory
        tasks: list[tuple[int, Any]] = []  # (bytes, (function, *args))
        todo = sorted(((self._entry(r), r) for r in plan.items), key=lambda er: (er[0].file, er[0].pos))
        self._sizes.check(e.file for e, _ in todo)
        for e, req in todo:
            if req.type == LoadItemType.BYTE_IO:
                tasks.append((e.length, (self._read_bytes_item, req, e, planner)))
                continue
            assert e.sizes is not None and e.dtype is not None
            dst = planner.resolve_tensor(req)
            whole = tuple(req.lengths) == e.sizes and not any(req.storage_offsets)
            if whole and dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == e.dtype:
                direct.append((req, dst))
                view = tensor_memoryview(dst)
                tasks.extend((min(BLOCK, e.length), (self._read_block, e, view, k)) for k in e.blocks())
            elif whole and dst.is_contiguous() and dst.dtype == e.dtype:
                direct.append((req, dst))
                to_device.append((e, dst))
            else:
                tasks.append((e.length, (self._read_resharded, req, e, dst, planner)))
            self.bytes_read += e.length
        self._bar = Progress(self.bytes_read, "ckptio load", enable=self._progress, delay=2.0)
        if self._local:
            self._files = _OpenFiles(self.backend)
        try:
            batches = _batches(tasks)
            if self.thread_count == 1 or (len(batches) <= 1 and not to_device):
                self.read_to_device(to_device, None)
                for _, batch in batches:
                    _run(batch)
            else:
                pool = _read_pool(self.thread_count)
                self.read_to_device(to_device, pool)  # before the host tasks take the pool
                _run_on(pool, batches, self.thread_count)
        finally:
            self._bar.close()
            if self._files is not None:
                self._files.close()
                self._files = None
            if self._prefetching:  # long done, as a rule: none outlives the load
                concurrent.futures.wait(self._prefetching)
                self._prefetching = []
        for req, dst in direct:
            planner.commit_tensor(req, dst)
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _entry(self, req: ReadItem) -> _Entry:
        off = tuple(req.storage_index.offset) if req.storage_index.offset is not None else None
        return self.entries[(req.storage_index.fqn, off)]

    def read_to_device(
        self, items: list[tuple[_Entry, torch.Tensor]], pool: ThreadPoolExecutor | None
    ) -> None:
        """Fill accelerator tensors through pinned bounce buffers (:class:`ckptio._device.DeviceWriter`):
        disk or network reads overlap the host-to-device copies, and the host never holds more
        than the bounce buffers of the checkpoint. Each piece is verified as it is read."""
        if not items:
            return
        with DeviceWriter(items[0][1].device, piece_bytes=BLOCK, read_pool=pool) as writer:
            for e, dst in items:
                writer.copy_into(dst, functools.partial(self._read_piece, e))

    def _read_block(self, e: _Entry, view: memoryview, k: int) -> None:
        self._read_piece(e, k * BLOCK, view[k * BLOCK : (k + 1) * BLOCK])

    def _read_piece(self, e: _Entry, off: int, piece: memoryview) -> None:
        """Read ``piece`` from chunk ``e`` at byte ``off`` (a multiple of :data:`BLOCK`), verified.

        On a local file system the block is read with ``preadv`` straight into ``piece``, in
        :data:`READ_PIECE`-sized parts each hashed as soon as it lands, while it is still in the CPU
        cache; elsewhere through :meth:`Backend.read_into`, then hashed."""
        k = off // BLOCK
        fpath = self.backend.join(self.path, e.file)
        hashing = self.verify and e.xxh3 is not None
        files = self._files
        try:
            fd = files.fileno(fpath) if files is not None else None
            if fd is not None:
                digest = _pread_hashed(self.backend, fd, fpath, e.pos + off, piece, hashing)
            else:
                self.backend.read_into(fpath, e.pos + off, piece)
                digest = _hash(piece) if hashing else None
        except FileNotFoundError as exc:  # deleted since its size was checked
            raise missing_file(self.backend, fpath, exc) from exc
        self._bar.update(len(piece))
        if hashing and e.xxh3 is not None and digest != e.xxh3[k]:
            url = self.backend.url(fpath)
            raise CorruptCheckpointError(
                f"checksum mismatch in {url} (tensor {e.fqn!r}): the file is damaged", path=url
            )

    def _read_bytes_item(self, req: ReadItem, e: _Entry, planner: LoadPlanner) -> None:
        fpath = self.backend.join(self.path, e.file)
        try:
            data = self.backend.read_bytes(fpath, e.pos, e.length)
        except FileNotFoundError as exc:
            raise missing_file(self.backend, fpath, exc) from exc
        if len(data) != e.length:
            raise CorruptCheckpointError(
                f"{self.backend.url(fpath)} is truncated", path=self.backend.url(fpath)
            )
        self._read_block_check(e, memoryview(data))
        with self._lock:
            planner.load_bytes(req, io.BytesIO(data))

    def _read_block_check(self, e: _Entry, view: memoryview) -> None:
        if not self.verify or e.xxh3 is None:
            return
        for k in e.blocks():
            if _hash(view[k * BLOCK : (k + 1) * BLOCK]) != e.xxh3[k]:
                url = self.backend.url(self.backend.join(self.path, e.file))
                raise CorruptCheckpointError(
                    f"checksum mismatch in {url} (tensor {e.fqn!r}): the file is damaged", path=url
                )

    def _read_resharded(self, req: ReadItem, e: _Entry, dst: torch.Tensor, planner: LoadPlanner) -> None:
        assert e.sizes is not None and e.dtype is not None
        tmp = torch.empty(e.sizes, dtype=e.dtype)
        view = tensor_memoryview(tmp)
        for k in e.blocks():
            self._read_block(e, view, k)
        src = tmp
        for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
            src = src.narrow(dim, o, n)
        dst.copy_(src)
        with self._lock:
            planner.commit_tensor(req, dst)


class _OpenFiles:
    """The data files that the threads of one ``read_data`` hold open, on local file systems.

    Each thread keeps the file it read last open (its tasks come sorted by file), so a file is
    opened about once per thread rather than once per block or small chunk; opening goes through
    :meth:`Backend.open_read`, so the backend's rules (no symlinks, regular files only) hold.
    :meth:`close` closes them all once the reads are done.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._open: dict[int, contextlib.ExitStack] = {}
        self.usable = True

    def fileno(self, fpath: str) -> int | None:
        """A file descriptor on ``fpath`` for ``preadv``, ``None`` where the backend gives none."""
        cur = getattr(self._tls, "cur", None)
        if cur is not None:
            if cur[0] == fpath:
                return int(cur[1])
            self._tls.cur = None
            self._drop(cur[2])
        if not self.usable:
            return None
        stack = contextlib.ExitStack()
        try:
            fd = stack.enter_context(self.backend.open_read(fpath)).fileno()
        except (AttributeError, io.UnsupportedOperation):  # no real file descriptor after all
            stack.close()
            self.usable = False
            return None
        except BaseException:
            stack.close()
            raise
        with self._lock:
            self._open[id(stack)] = stack
        self._tls.cur = (fpath, fd, stack)
        if _FADV_SEQUENTIAL is not None:  # each thread reads its share front to back: a readahead
            with contextlib.suppress(OSError):  # window twice the default keeps a cold disk busier
                os.posix_fadvise(fd, 0, 0, _FADV_SEQUENTIAL)
        return int(fd)

    def _drop(self, stack: contextlib.ExitStack) -> None:
        with self._lock:
            self._open.pop(id(stack), None)
        stack.close()

    def close(self) -> None:
        with self._lock:
            stacks, self._open = list(self._open.values()), {}
        for stack in stacks:
            stack.close()


_FADV_SEQUENTIAL: int | None = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


def _wanted_entries(entries: Iterable[_Entry], expanded: dict[str, Any]) -> list[_Entry]:
    """The entries that a load of the state ``expanded`` reads, sorted by file and position: those
    whose name is a key of ``expanded``, or lies under one (DCP names ``{"model": {"w": t}}``'s
    tensor ``model.w``)."""
    keys = set(expanded)
    out = []
    for e in entries:
        name = e.fqn
        if name in keys:
            out.append(e)
            continue
        dot = name.find(".")
        while dot > 0:
            if name[:dot] in keys:
                out.append(e)
                break
            dot = name.find(".", dot + 1)
    return _sorted_entries(out)


def _share_heads(
    ordered: list[_Entry], n: int, length: int, files: dict[str, dict[str, Any]]
) -> list[tuple[str, int, int]]:
    """``(file, start, bytes)`` of the first ``length`` bytes of each of the ``n`` shares that
    :func:`_run_on` cuts ``ordered`` into (about equal bytes, in file order), each span kept
    inside its file's declared size."""
    total = sum(e.length for e in ordered)
    heads: list[tuple[str, int]] = []
    done = 0
    for e in ordered:
        for off in range(0, e.length, BLOCK):  # shares are cut between blocks, as reads are
            if not heads or (done >= total * len(heads) / n and len(heads) < n):
                heads.append((e.file, e.pos + off))
            done += min(BLOCK, e.length - off)
    spans = []
    for name, start in heads:
        info = files.get(name)
        size = info.get("size") if isinstance(info, dict) else None
        if type(size) is int and size > start:
            spans.append((name, start, min(length, size - start)))
    return spans


def _pread_hashed(
    backend: Backend, fd: int, fpath: str, start: int, out: memoryview, hashing: bool
) -> str | None:
    """Fill ``out`` from ``fd`` at ``start`` in :data:`READ_PIECE`-sized ``preadv`` calls; when
    ``hashing``, each part is hashed right after it lands (still in cache), and the xxh3-64 of
    ``out`` is returned.
    An ``OSError`` is left to :meth:`Backend.read_into` to retry or report in the backend's terms;
    a file that ends early is damage."""
    h = xxhash.xxh3_64() if hashing else None
    n = len(out)
    step = READ_PIECE  # unverified too: a cold disk's readahead keeps ahead of 1 MiB calls, not 16
    done = 0
    while done < n:
        try:
            got = os.preadv(fd, [out[done : min(n, done + step)]], start + done)
        except OSError:
            backend.read_into(fpath, start + done, out[done:])
            got = n - done
        if got == 0:
            url = backend.url(fpath)
            raise CorruptCheckpointError(
                f"{url} is truncated: wanted {n} bytes at offset {start}, got {done}", path=url
            )
        if h is not None:
            h.update(out[done : done + got])
        done += got
    return h.hexdigest() if h is not None else None


class NativeFormat(Format):
    """DCP-planned raw tensor files with JSON metadata (see the module docstring)."""

    name = "native"
    save_options = NativeSaveOptions
    load_options = NativeLoadOptions

    def storage_writer(
        self, backend: Backend, path: str, options: Any = None, *, progress: bool | None = None
    ) -> NativeWriter:
        return NativeWriter(backend, path, options or NativeSaveOptions(), progress=progress)

    def storage_reader(
        self,
        backend: Backend,
        path: str,
        manifest: Manifest | None,
        options: Any = None,
        *,
        verify: bool = True,
        progress: bool | None = None,
        state_keys: Sequence[str] = (),
    ) -> NativeReader:
        if manifest is None:
            raise CorruptCheckpointError(f"{backend.url(path)}: native checkpoints need their manifest")
        return NativeReader(backend, path, manifest, options, verify=verify, progress=progress)

    def verify(self, backend: Backend, path: str, manifest: Manifest) -> int:
        where = backend.url(path)
        _, entries = metadata_from_json(manifest.format_metadata, manifest.files, where)
        with no_gc():  # CPU-bound bookkeeping of possibly a million entries
            ordered = _sorted_entries(entries.values())
            runs = list(_read_runs(ordered))
        FileSizeChecker(backend, path, manifest.files).check(
            [e.file for e in ordered] + [n for n in manifest.files if n.endswith(".bin")]
        )
        checked = 0
        for run in runs:
            fpath = backend.join(path, run[0].file)
            if len(run) == 1 and run[0].length > BLOCK:  # a big chunk: block by block
                e = run[0]
                for k in e.blocks():
                    n = min(BLOCK, e.length - k * BLOCK)
                    data = _read_span(backend, fpath, e.pos + k * BLOCK, n)
                    assert e.xxh3 is not None  # verify requires checksums
                    if _hash(data) != e.xxh3[k]:
                        raise _mismatch(backend, fpath, e)
            else:  # small chunks back to back (each one block): one read for all
                start = run[0].pos
                data = _read_span(backend, fpath, start, run[-1].pos + run[-1].length - start)
                for e in run:
                    lo = e.pos - start
                    assert e.xxh3 is not None
                    if _hash(data[lo : lo + e.length]) != e.xxh3[0]:
                        raise _mismatch(backend, fpath, e)
            checked += sum(e.length for e in run)
        return checked

    def tensors(self, backend: Backend, path: str, manifest: Manifest | None) -> list[TensorEntry]:
        if manifest is None:
            return []
        md, entries = metadata_from_json(
            manifest.format_metadata, manifest.files, backend.url(path), require_checksums=False
        )
        return tensor_entries(md, entries.values())


def _batches(
    tasks: list[tuple[int, Any]], limit: int = 1 << 20, count: int = 256
) -> list[tuple[int, list[Any]]]:
    """Group consecutive small read tasks (up to ``limit`` bytes or ``count`` tasks) so that a
    tensor of many small chunks is not one thread-pool submission per chunk; big blocks stay
    alone, so they are still read in parallel. Returns ``(bytes, tasks)`` per batch."""
    out: list[tuple[int, list[Any]]] = []
    cur: list[Any] = []
    size = 0
    for n, task in tasks:
        if cur and (size + n > limit or len(cur) >= count):
            out.append((size, cur))
            cur, size = [], 0
        cur.append(task)
        size += n
    if cur:
        out.append((size, cur))
    return out


def _run(batch: list[Any]) -> None:
    for fn, *args in batch:
        fn(*args)


def _run_on(pool: ThreadPoolExecutor, batches: list[tuple[int, list[Any]]], n: int) -> None:
    """Run ``batches`` (in file order) on ``n`` threads: the caller and ``n - 1`` of ``pool``'s.

    Each thread gets a contiguous share of about the same bytes and reads it front to back, so
    every thread's reads are sequential in its file and the kernel's readahead stays ahead of
    them on a cold disk (threads taking turns at consecutive blocks look random to it). A thread
    done with its share takes batches from the end of the longest share left. After a failure no
    new batch starts; the first error is raised once every thread has stopped, so nothing still
    writes into the destination."""
    total = sum(size for size, _ in batches)
    shares: list[collections.deque[list[Any]]] = [collections.deque()]
    done = 0
    for size, batch in batches:
        if done >= total * len(shares) / n and shares[-1] and len(shares) < n:
            shares.append(collections.deque())
        shares[-1].append(batch)
        done += size
    lock = threading.Lock()
    failed: list[BaseException] = []

    def take(i: int) -> list[Any] | None:
        with lock:
            if shares[i]:
                return shares[i].popleft()
            longest = max(shares, key=len)
            return longest.pop() if longest else None

    def drain(i: int) -> None:
        while not failed:
            batch = take(i)
            if batch is None:
                return
            try:
                _run(batch)
            except BaseException as exc:
                failed.append(exc)
                raise

    helpers = [pool.submit(drain, i) for i in range(1, len(shares))]
    try:
        drain(0)
    finally:
        concurrent.futures.wait(helpers)
    for f in helpers:
        f.result()


_pool_lock = threading.Lock()
_pool: list[Any] = [None, 0]  # the process's reader pool and its size


def _read_pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``n`` reader threads, kept from one load to the next:
    starting a thread costs a load up to ~10 ms on a busy machine, where ranks start theirs all
    at once. Grown (replaced) when a load wants more threads; forgotten in a forked child."""
    with _pool_lock:
        pool, size = _pool
        if pool is None or size < n:
            if pool is not None:
                pool.shutdown(wait=False)  # its threads finish what they run, then exit
            pool = ThreadPoolExecutor(n, thread_name_prefix="ckptio-read")
            _pool[:] = [pool, n]
        return pool  # type: ignore[no-any-return]


def _forget_read_pool() -> None:
    """In a forked child the parent's threads do not exist: start over (lock included)."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool[:] = [None, 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_read_pool)


def _sorted_entries(entries: Iterable[_Entry]) -> list[_Entry]:
    return sorted(entries, key=lambda e: (e.file, e.pos))


def _read_span(backend: Backend, fpath: str, start: int, n: int) -> memoryview:
    """Exactly ``n`` bytes of ``fpath`` at ``start``; a short read is damage."""
    try:
        data = memoryview(backend.read_bytes(fpath, start, n)) if n else memoryview(b"")
    except FileNotFoundError as exc:
        raise missing_file(backend, fpath, exc) from exc
    if len(data) != n:
        url = backend.url(fpath)
        raise CorruptCheckpointError(
            f"{url} is truncated: wanted {n} bytes at offset {start}, got {len(data)}", path=url
        )
    return data


def _mismatch(backend: Backend, fpath: str, e: _Entry) -> CorruptCheckpointError:
    url = backend.url(fpath)
    return CorruptCheckpointError(
        f"checksum mismatch in {url} (tensor {e.fqn!r}): the file is damaged", path=url
    )


def _read_runs(ordered: list[_Entry], limit: int = BLOCK) -> Iterable[list[_Entry]]:
    """Group entries (sorted by file and position) into runs read with one request: back to
    back in one file and together at most ``limit`` bytes; a larger entry is a run of its own."""
    run: list[_Entry] = []
    size = 0
    for e in ordered:
        if run and (
            e.file != run[-1].file
            or e.pos != run[-1].pos + run[-1].length
            or size + e.length > limit
            or e.length > limit
        ):
            yield run
            run, size = [], 0
        run.append(e)
        size += e.length
    if run:
        yield run


@hookimpl
def register_formats(register: Any) -> None:
    register("native", NativeFormat)


__all__ = [
    "NativeFormat",
    "NativeLoadOptions",
    "NativeReader",
    "NativeSaveOptions",
    "NativeWriter",
    "metadata_from_json",
    "metadata_to_json",
    "tiling_problem",
]
