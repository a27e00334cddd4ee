"""The native format: DCP planning, raw tensor bytes, JSON metadata.

Layout of a checkpoint directory::

    manifest.json          commit record (written last by the core), holds the metadata below
    __<rank>_<k>.bin       raw little-endian bytes of the tensors (chunks) one rank wrote,
                           back to back; ``k`` is the writer thread

The metadata is DCP's ``Metadata`` in JSON (tensors: dtype, global size, chunks; per chunk: file,
offset, length, xxh3-64 checksum). It is not a pickle, so loading a checkpoint cannot run code, and
every number in it is checked before use. Because the bytes are raw, a load reads each chunk
straight into the destination tensor (``preadv`` locally, ranged reads on object stores) with
no intermediate ``torch.load``; resharding falls back to a bounded temporary per chunk.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterable
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
from ..backend import Backend
from ..errors import CorruptCheckpointError, InvalidURLError, UnsafeCheckpointError
from ..hookspecs import hookimpl
from ..manifest import Manifest
from ..progress import Progress
from ..serialization import MAX_BYTES, dtype_name, parse_dtype
from ..url import join_path
from .base import Format, FormatReader, FormatWriter, TensorEntry, tensor_entries

DEFAULT_WRITE_THREADS = 2
DEFAULT_READ_THREADS = 4
#: Checksums cover blocks of this size, so big tensors are read and verified in parallel pieces,
#: each hashed while it is still in the CPU cache.
BLOCK = 16 << 20
_MAX_DIM = 1 << 62


@dataclass(frozen=True)
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
    hashes = (value,) if isinstance(value, str) else value
    if (
        not isinstance(hashes, (list, tuple))
        or not all(isinstance(h, str) for h in hashes)
        or len(hashes) != max(1, -(-length // BLOCK))
    ):
        raise CorruptCheckpointError(f"{where}: bad checksum list for {fqn!r}")
    return tuple(hashes)


# -- writer --------------------------------------------------------------------------------
class NativeWriter(FormatWriter):
    """Writes each rank's items into ``thread_count`` files, one writer thread per file."""

    def write_items(self, items: list[WriteItem], planner: SavePlanner, prefix: str) -> list[WriteResult]:
        n_threads = max(1, int(self.options.get("thread_count", DEFAULT_WRITE_THREADS)))
        buckets = _split_by_size(items, n_threads)
        names = [f"{prefix}_{k}.bin" for k in range(len(buckets))]
        total = sum(_item_size(it) for it in items)
        self._bar = Progress(total, "ckptio save", enable=_progress_enabled(self.options), delay=2.0)
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
                    f.write(block)
                    hashes.append(_hash(block))
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


def _progress_enabled(options: dict[str, Any]) -> bool | None:
    """``progress=False`` (background saves) silences the bar; ``None`` lets the terminal decide."""
    return False if options.get("progress") is False else None


def _item_size(it: WriteItem) -> int:
    if it.tensor_data is None:
        return 0
    return math.prod(it.tensor_data.size) * it.tensor_data.properties.dtype.itemsize


def _split_by_size(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
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
                "dtype": dtype_name(m.properties.dtype),
                "size": list(m.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks],
            }
        else:
            tensors[fqn] = None  # a JSON value stored as bytes
    planner_data = None
    if isinstance(md.planner_data, dict):
        planner_data = {k: list(v) for k, v in md.planner_data.items()}
    return {"state": tensors, "planner_data": planner_data, "version": md.version}


def _int_list(x: Any, where: str) -> tuple[int, ...]:
    if not isinstance(x, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise CorruptCheckpointError(f"{where}: expected a list of integers")
    if any(i < 0 or i > _MAX_DIM for i in x):
        raise CorruptCheckpointError(f"{where}: negative or absurd size in {x}")
    return tuple(x)


def metadata_from_json(
    fm: dict[str, Any], files: dict[str, dict[str, Any]], where: str
) -> tuple[Metadata, dict]:
    """Rebuild DCP ``Metadata`` and the chunk table, checking every number against the files.

    The checks below name what they reject; anything a hostile manifest slips past them with the
    wrong JSON type (a list where a name belongs...) still ends as a :class:`CorruptCheckpointError`.
    """
    try:
        return _metadata_from_json(fm, files, where)
    except CorruptCheckpointError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise CorruptCheckpointError(
            f"{where}: native metadata is malformed ({type(exc).__name__}: {exc})"
        ) from exc


def _metadata_from_json(
    fm: dict[str, Any], files: dict[str, dict[str, Any]], where: str
) -> tuple[Metadata, dict]:
    try:
        dcp = fm["dcp"]
        state = dcp["state"]
        storage = fm["storage"]
        if not isinstance(state, dict) or not isinstance(storage, list):
            raise TypeError("state/storage")
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{where}: native metadata is malformed ({exc})") from exc
    sdm: dict[str, Any] = {}
    for fqn, t in state.items():
        if t is None:
            sdm[fqn] = BytesStorageMetadata()
            continue
        if not isinstance(t, dict) or not isinstance(t.get("chunks"), list):
            raise CorruptCheckpointError(f"{where}: bad entry for tensor {fqn!r}")
        dtype = parse_dtype(t.get("dtype", "?"))
        size = _int_list(t.get("size"), f"{where}: {fqn} size")
        chunks = []
        covered = 0
        for c in t["chunks"]:
            if not isinstance(c, list) or len(c) != 2:
                raise CorruptCheckpointError(f"{where}: bad chunk for {fqn!r}")
            off, sz = _int_list(c[0], f"{where}: {fqn} offsets"), _int_list(c[1], f"{where}: {fqn} sizes")
            if (
                len(off) != len(size)
                or len(sz) != len(size)
                or any(o + s > d for o, s, d in zip(off, sz, size))
            ):
                raise CorruptCheckpointError(
                    f"{where}: chunk {list(off)}+{list(sz)} is out of range for {fqn!r}{list(size)}"
                )
            covered += math.prod(sz)
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(sz)))
        if covered != math.prod(size) or _overlap(chunks):
            raise CorruptCheckpointError(f"{where}: chunks of {fqn!r} overlap or do not cover the tensor")
        sdm[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(size), chunks=chunks
        )
    entries: dict[tuple[str, tuple[int, ...] | None], _Entry] = {}
    for s in storage:
        try:
            fqn, file, pos, length = s["fqn"], s["file"], s["pos"], s["length"]
            offsets = tuple(s["offsets"]) if s["offsets"] is not None else None
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pos, length)):
                raise TypeError("pos/length")
            join_path("/x", file)
        except InvalidURLError as exc:
            raise UnsafeCheckpointError(
                f"{where}: file name {file!r} escapes the checkpoint", path=where
            ) from exc
        except Exception as exc:
            raise CorruptCheckpointError(f"{where}: malformed storage entry ({exc})") from exc
        m = sdm.get(fqn)
        finfo = files.get(file)
        if m is None or finfo is None:
            raise CorruptCheckpointError(
                f"{where}: storage entry for unknown tensor or file ({fqn!r}, {file!r})"
            )
        if pos < 0 or length < 0 or pos + length > finfo["size"]:
            raise CorruptCheckpointError(
                f"{where}: {fqn!r} lies outside {file!r} ({pos}+{length} > {finfo['size']})"
            )
        if isinstance(m, TensorStorageMetadata):
            chunk = next((c for c in m.chunks if tuple(c.offsets) == offsets), None)
            if chunk is None or length != math.prod(chunk.sizes) * m.properties.dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{where}: stored length of {fqn!r} does not match its shape and dtype"
                )
            entry = _Entry(
                fqn,
                offsets,
                tuple(chunk.sizes),
                m.properties.dtype,
                file,
                pos,
                length,
                _parse_hashes(s.get("xxh3"), length, where, fqn),
            )
        else:
            if length > MAX_BYTES:
                raise CorruptCheckpointError(f"{where}: value {fqn!r} is {length} bytes, refusing")
            entry = _Entry(
                fqn, None, None, None, file, pos, length, _parse_hashes(s.get("xxh3"), length, where, fqn)
            )
        entries[(fqn, offsets)] = entry
    for fqn, m in sdm.items():
        keys = (
            [(fqn, tuple(c.offsets)) for c in m.chunks]
            if isinstance(m, TensorStorageMetadata)
            else [(fqn, None)]
        )
        if any(k not in entries for k in keys):
            raise CorruptCheckpointError(f"{where}: no stored data for {fqn!r}")
    pd = dcp.get("planner_data")
    planner_data = {k: tuple(v) for k, v in pd.items()} if isinstance(pd, dict) else None
    md = Metadata(state_dict_metadata=sdm, planner_data=planner_data, storage_data=entries)
    return md, entries


def _overlap(chunks: list[ChunkStorageMetadata]) -> bool:
    if len(chunks) > 256:  # the coverage sum already catches gaps; pairwise is quadratic
        return False
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)
            ):
                if all(s > 0 for s in a.sizes) and all(s > 0 for s in b.sizes):
                    return True
    return False


# -- reader --------------------------------------------------------------------------------
class NativeReader(FormatReader):
    """Reads chunks straight into destination tensors, in parallel, verifying checksums."""

    def __init__(self, backend: Backend, path: str, manifest: Manifest, **options: Any) -> None:
        super().__init__()
        self.backend = backend
        self.path = path
        self.manifest = manifest
        self.verify = bool(options.get("verify", True))
        self.thread_count = max(1, int(options.get("thread_count", DEFAULT_READ_THREADS)))
        where = backend.url(path)
        self.metadata, self.entries = metadata_from_json(manifest.format_metadata, manifest.files, where)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._progress = _progress_enabled(options)
        self._bar = Progress(0, "", enable=False)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        """Read every item; chunks that land whole in a contiguous destination are read straight
        into it, block by block in parallel (each block hashed while hot in cache); the rest
        (resharding, dtype or device changes) go through one temporary per chunk."""
        direct: list[tuple[ReadItem, torch.Tensor]] = []
        tasks: list[Any] = []
        for req in sorted(plan.items, key=lambda r: (self._entry(r).file, self._entry(r).pos)):
            e = self._entry(req)
            if req.type == LoadItemType.BYTE_IO:
                tasks.append((self._read_bytes_item, req, e, planner))
                continue
            assert e.sizes is not None and e.dtype is not None
            dst = planner.resolve_tensor(req)
            whole = tuple(req.lengths) == e.sizes and not any(req.storage_offsets)
            if whole and dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == e.dtype:
                direct.append((req, dst))
                view = tensor_memoryview(dst)
                tasks.extend((self._read_block, e, view, k) for k in e.blocks())
            else:
                tasks.append((self._read_resharded, req, e, dst, planner))
            self.bytes_read += e.length
        self._bar = Progress(self.bytes_read, "ckptio load", enable=self._progress, delay=2.0)
        try:
            if self.thread_count == 1 or len(tasks) <= 1:
                for fn, *args in tasks:
                    fn(*args)
            else:
                with ThreadPoolExecutor(self.thread_count, thread_name_prefix="ckptio-read") as pool:
                    for f in [pool.submit(fn, *args) for fn, *args in tasks]:
                        f.result()
        finally:
            self._bar.close()
        for req, dst in direct:
            planner.commit_tensor(req, dst)
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _entry(self, req: ReadItem) -> _Entry:
        off = tuple(req.storage_index.offset) if req.storage_index.offset is not None else None
        return self.entries[(req.storage_index.fqn, off)]

    def _read_block(self, e: _Entry, view: memoryview, k: int) -> None:
        piece = view[k * BLOCK : (k + 1) * BLOCK]
        fpath = self.backend.join(self.path, e.file)
        self.backend.read_into(fpath, e.pos + k * BLOCK, piece)
        self._bar.update(len(piece))
        if self.verify and e.xxh3 is not None and _hash(piece) != e.xxh3[k]:
            url = self.backend.url(fpath)
            raise CorruptCheckpointError(
                f"checksum mismatch in {url} (tensor {e.fqn!r}): the file is damaged", path=url
            )

    def _read_bytes_item(self, req: ReadItem, e: _Entry, planner: LoadPlanner) -> None:
        fpath = self.backend.join(self.path, e.file)
        data = self.backend.read_bytes(fpath, e.pos, e.length)
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


class NativeFormat(Format):
    """DCP-planned raw tensor files with JSON metadata (see the module docstring)."""

    name = "native"

    def storage_writer(self, backend: Backend, path: str, **options: Any) -> NativeWriter:
        return NativeWriter(backend, path, **options)

    def storage_reader(
        self, backend: Backend, path: str, manifest: Manifest | None, **options: Any
    ) -> NativeReader:
        if manifest is None:
            raise CorruptCheckpointError(f"{backend.url(path)}: native checkpoints need their manifest")
        return NativeReader(backend, path, manifest, **options)

    def verify(self, backend: Backend, path: str, manifest: Manifest) -> int:
        where = backend.url(path)
        _, entries = metadata_from_json(manifest.format_metadata, manifest.files, where)
        for name, info in manifest.files.items():
            if name.endswith(".bin"):
                actual = backend.size(backend.join(path, name))
                if actual != info["size"]:
                    raise CorruptCheckpointError(
                        f"{backend.url(backend.join(path, name))} has {actual} bytes, manifest says {info['size']}",
                        path=backend.url(backend.join(path, name)),
                    )
        checked = 0
        for e in _sorted_entries(entries.values()):
            fpath = backend.join(path, e.file)
            ok = True
            for k in e.blocks():
                length = min(BLOCK, e.length - k * BLOCK)
                data = backend.read_bytes(fpath, e.pos + k * BLOCK, length)
                ok = ok and len(data) == length and (e.xxh3 is None or _hash(data) == e.xxh3[k])
            if not ok:
                raise CorruptCheckpointError(
                    f"checksum mismatch in {backend.url(fpath)} (tensor {e.fqn!r}): the file is damaged",
                    path=backend.url(fpath),
                )
            checked += e.length
        return checked

    def tensors(self, backend: Backend, path: str, manifest: Manifest | None) -> list[TensorEntry]:
        if manifest is None:
            return []
        md, entries = metadata_from_json(manifest.format_metadata, manifest.files, backend.url(path))
        return tensor_entries(md, entries.values())


def _sorted_entries(entries: Iterable[_Entry]) -> list[_Entry]:
    return sorted(entries, key=lambda e: (e.file, e.pos))


@hookimpl
def register_formats(register: Any) -> None:
    register("native", NativeFormat)


__all__ = ["NativeFormat", "NativeReader", "NativeWriter", "metadata_from_json", "metadata_to_json"]
