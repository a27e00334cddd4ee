"""Consolidation: a sharded checkpoint -> one HF directory that ``from_pretrained`` loads.

Sources: a ckptio ``safetensors`` or ``native`` checkpoint (its manifest says where every chunk
of every tensor lies) or a manifest-less safetensors directory (torch's HF writer with
``DCP_SHARDING_INFO``, or a plain HF directory to re-shard or cast).

How it stays fast and small:

* Each full tensor is assembled by ranged reads straight into its place in a buffer (a chunk
  that is a band of rows lands in place with no copy; others go through a chunk-sized temporary),
  checksums are checked on the way, and the tensor is streamed out right after the header. The
  buffers come from one reused arena (``_Ring``, by default the size of the largest tensor), so
  peak memory is about one tensor whatever the model size, no page is faulted in twice, and the
  next tensors are read while the current one is written.
* Every dtype works (torch's consolidator computes element sizes with ``finfo`` and crashes on
  integer tensors); casts touch ordinary float tensors only.
* Output appears atomically, through ckptio's commit protocol (:mod:`ckptio.commit`): on
  ``rename`` backends every file (shards, then the index last) goes to a unique staging directory
  renamed into place in one step, so a crash at any moment leaves the old directory or the new
  one, never a mix, and the next touch of the URL finishes or undoes an interrupted replacement;
  on ``marker`` backends (object stores) the old index goes first and the new one is written last,
  so a directory without its index is incomplete. A non-empty destination is replaced, whole,
  only with ``overwrite=True``; otherwise nothing in it is touched.
* With a ``process_group`` each rank writes every ``world_size``-th output file; the coordinator
  writes the index once every rank has finished.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from ckptio import ext
from ckptio.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptio.ext import (
    Backend,
    Target,
    huge_page_empty,
    metadata_from_json,
    open_backend,
    parse_url,
    read_limited,
    read_manifest,
    recover,
    tensor_memoryview,
)
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ._header import HeaderEntry, encode_header, layout, read_header
from .conversion import hf_source_view, verify_cut
from .format import Chunk, foreign_metadata, hf_files, manifest_metadata
from .hf import (
    HF_METADATA,
    INDEX_NAME,
    index_bytes,
    index_dict,
    make_plan,
    parse_cast,
    target_dtype,
)

log = logging.getLogger("ckptio.safetensors")


@dataclass
class SourceTensor:
    """A tensor of the source: global metadata and the stored chunks that make it up."""

    meta: TensorStorageMetadata
    chunks: list[Chunk]


@dataclass
class Source:
    backend: Backend
    path: str
    tensors: dict[str, SourceTensor]
    #: checksums of native-format chunks (one per block, or one string in older checkpoints)
    native_hashes: dict[tuple[str, tuple[int, ...] | None], Any] = field(default_factory=dict)
    #: per tensor, the stored chunks it is cut from, to be checked whole before it is assembled
    #: (set by :func:`~ckptio_safetensors.conversion.hf_source_view`)
    cut: dict[str, dict[tuple[str, tuple[int, ...] | None], Any]] = field(default_factory=dict)


def _open_source(
    url: str, group: str | None, storage_options: dict[str, Any] | None, verify: bool = True
) -> Source:
    """The tensors of a checkpoint to consolidate; checksums are required only when ``verify``."""
    u, backend = open_backend(url, storage_options)
    manifest = read_manifest(backend, u.path)
    native_hashes: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    if manifest is None:
        if not backend.listdir(u.path):
            raise CheckpointNotFoundError(f"no checkpoint at {u}")
        md, entries = foreign_metadata(backend, u.path)
        names = {fqn: fqn for fqn in md.state_dict_metadata}
    elif manifest.format == "safetensors":
        md, entries = manifest_metadata(manifest, backend.url(u.path), require_checksums=verify)
        names = _select_group(manifest, md, group)
    elif manifest.format == "native":
        md, native_entries = metadata_from_json(
            manifest.format_metadata, manifest.files, backend.url(u.path), require_checksums=verify
        )
        entries = {}
        for key, e in native_entries.items():
            entries[key] = Chunk(e.fqn, e.offsets, e.sizes, e.dtype, e.file, e.pos, e.length, None)
            native_hashes[key] = e.xxh3
        names = _select_group(manifest, md, group)
    else:
        raise CheckpointError(
            f"{u} is a {manifest.format!r} checkpoint; consolidation reads safetensors or native ones"
        )
    by_fqn: dict[str, list[Chunk]] = collections.defaultdict(list)
    for e in entries.values():
        by_fqn[e.fqn].append(e)
    tensors = {}
    for fqn, out_name in names.items():
        m = md.state_dict_metadata[fqn]
        if isinstance(m, TensorStorageMetadata):
            tensors[out_name] = SourceTensor(m, by_fqn[fqn])
    if not tensors:
        raise CheckpointError(f"{u} holds no tensors{f' in group {group!r}' if group else ''} to consolidate")
    _check_source(backend, u.path, tensors, backend.url(u.path))
    return Source(backend, u.path, tensors, native_hashes)


def _check_source(backend: Backend, path: str, tensors: dict[str, SourceTensor], where: str) -> None:
    """Every tensor is made of chunks that lie inside it, hold as many elements as it has, and are
    backed by bytes that really are in the files: so nothing larger than the stored data is ever
    allocated, and no element is left unwritten by a gap (formats also check overlaps)."""
    sizes: dict[str, int] = {}
    for name, st in tensors.items():
        shape = tuple(st.meta.size)
        itemsize = st.meta.properties.dtype.itemsize
        covered = 0
        for c in st.chunks:
            if (
                c.offsets is None
                or c.sizes is None
                or len(c.offsets) != len(shape)
                or len(c.sizes) != len(shape)
                or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(c.offsets, c.sizes, shape))
                or c.length != math.prod(c.sizes) * itemsize
            ):
                raise CorruptCheckpointError(
                    f"{where}: a chunk of {name!r} does not fit its shape {list(shape)}"
                )
            if c.file not in sizes:
                sizes[c.file] = backend.size(backend.join(path, c.file))
            if c.pos < 0 or c.pos + c.length > sizes[c.file]:
                raise CorruptCheckpointError(
                    f"{where}: {name!r} lies beyond the end of {c.file} ({sizes[c.file]} bytes)",
                    path=backend.url(backend.join(path, c.file)),
                )
            covered += math.prod(c.sizes)
        if covered != math.prod(shape):
            raise CorruptCheckpointError(
                f"{where}: the chunks of {name!r} hold {covered} elements, the tensor has {math.prod(shape)}"
            )


def _select_group(manifest: Any, md: Any, group: str | None) -> dict[str, str]:
    """``{stored fqn: output name}`` for the tensors of one top-level state entry (``model`` by
    default when there is one, else the top-level tensors), with that entry's key removed."""
    fm = manifest.format_metadata
    if isinstance(fm.get("names"), dict):  # safetensors: the writer recorded (group, name) per fqn
        pairs = {fqn: tuple(gn) for fqn, gn in fm["names"].items()}
    else:  # native: flattened keys, the first component is the top-level state key
        pairs = {fqn: tuple(fqn.split(".", 1)) if "." in fqn else ("", fqn) for fqn in md.state_dict_metadata}
    groups = {g for g, _ in pairs.values()}
    if group is None:
        group = "model" if "model" in groups else ("" if "" in groups else None)
        if group is None:
            raise CheckpointError(
                f"choose what to consolidate with group=...; the checkpoint holds {sorted(groups)}"
            )
    selected = {fqn: name for fqn, (g, name) in pairs.items() if g == group}
    if not selected:
        raise CheckpointError(f"no tensors under {group!r}; the checkpoint holds {sorted(groups)}")
    return selected


#: An HF index is a few hundred KB even for the largest models.
_MAX_JSON_BYTES = 64 << 20


def _read_json(url: str, storage_options: dict[str, Any] | None, default_name: str) -> Any:
    u, backend = open_backend(url, storage_options)
    path = u.path
    if not path.endswith(".json"):
        path = backend.join(path, default_name)
    try:
        return json.loads(read_limited(backend, path, _MAX_JSON_BYTES, "index"))
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{backend.url(path)} is not valid JSON ({exc})") from exc


def reference_dtypes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.dtype]:
    """Per-tensor dtypes from the safetensors headers of a reference HF directory."""
    u, backend = open_backend(url, storage_options)
    out: dict[str, torch.dtype] = {}
    for f in hf_files(backend, u.path):
        for name, he in read_header(backend, backend.join(u.path, f)).entries.items():
            out[name] = he.dtype
    return out


class _Assembler:
    """Builds full tensors from their chunks with ranged reads, checking checksums."""

    def __init__(self, src: Source, verify: bool) -> None:
        self.src = src
        self.verify = verify

    def source_dtype(self, name: str) -> torch.dtype:
        return self.src.tensors[name].meta.properties.dtype

    def source_nbytes(self, name: str) -> int:
        meta = self.src.tensors[name].meta
        return math.prod(meta.size) * meta.properties.dtype.itemsize

    def __call__(self, name: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor ``name`` as ``dtype``, assembled into ``out`` (raw bytes) when given."""
        st = self.src.tensors[name]
        size = tuple(st.meta.size)
        src_dtype = st.meta.properties.dtype
        full = torch.empty(size, dtype=src_dtype) if out is None else out.view(src_dtype).view(size)
        for e in st.chunks:
            assert e.offsets is not None and e.sizes is not None
            fpath = self.src.backend.join(self.src.path, e.file)
            band = not size or (all(o == 0 for o in e.offsets[1:]) and tuple(e.sizes[1:]) == size[1:])
            if band:
                dst = full.narrow(0, e.offsets[0], e.sizes[0]) if size else full
                self._read(fpath, e, tensor_memoryview(dst))
            else:
                tmp = torch.empty(e.sizes, dtype=full.dtype)
                self._read(fpath, e, tensor_memoryview(tmp))
                region = full
                for d, (o, n) in enumerate(zip(e.offsets, e.sizes)):
                    region = region.narrow(d, o, n)
                region.copy_(tmp)
        return full if full.dtype == dtype else full.to(dtype)

    def _read(self, fpath: str, e: Chunk, view: memoryview) -> None:
        if len(view) != e.length:
            raise CorruptCheckpointError(f"{e.fqn!r}: stored length {e.length} does not match its shape")
        if len(view):
            self.src.backend.read_into(fpath, e.pos, view)
        if self.verify and not _hash_ok(view, e.xxh3 or self.src.native_hashes.get((e.fqn, e.offsets))):
            where = self.src.backend.url(fpath)
            raise CorruptCheckpointError(
                f"checksum mismatch in {where} (tensor {e.fqn!r}): the file is damaged", path=where
            )


def _hash_ok(view: memoryview, expected: Any) -> bool:
    """Check a chunk against its xxh3-64: one digest of the whole chunk, or (native checkpoints)
    one per ``BLOCK`` bytes."""
    if expected is None:
        return True
    if isinstance(expected, str):
        return xxhash.xxh3_64_hexdigest(view) == expected
    block = ext.CHECKSUM_BLOCK or len(view) or 1
    pieces = [view[k : k + block] for k in range(0, max(1, len(view)), block)]
    return len(pieces) == len(expected) and all(
        xxhash.xxh3_64_hexdigest(p) == h for p, h in zip(pieces, expected)
    )


class _Ring:
    """A reusable byte arena for assembled tensors, handed out and given back in FIFO order.

    Output tensors are assembled ahead of the writer and written in file order, so their buffers
    live and die in the same order: a ring fits exactly. One arena allocated once (huge-page
    advised) replaces a fresh ``torch.empty`` per tensor, whose first-touch page faults cost more
    than the disk write on a VM; and the writer gives back each written piece at once, so the next
    tensors are assembled into the space the current one is leaving while it is still being
    written. Peak memory stays at the arena's size. Used from one thread only (the writer's).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = huge_page_empty(torch.Size([capacity]), torch.uint8)
        self.live: collections.deque[list[int]] = collections.deque()  # [start, end), oldest first
        self.head = 0

    def take(self, n: int) -> torch.Tensor | None:
        """``n`` contiguous bytes after every region handed out before, or ``None`` if full."""
        if not self.live:
            start = 0 if n <= self.capacity else -1
        else:
            tail = self.live[0][0]
            if self.head > tail:  # used: [tail, head); free: [head, capacity) and [0, tail)
                start = self.head if n <= self.capacity - self.head else (0 if n <= tail else -1)
            else:  # wrapped: free is [head, tail)
                start = self.head if n <= tail - self.head else -1
        if start < 0:
            return None
        self.live.append([start, start + n])
        self.head = start + n
        return self.buf[start : start + n]

    def give_back(self, n: int) -> None:
        """Release the next ``n`` bytes of the oldest region (all of it when ``n`` covers it)."""
        region = self.live[0]
        region[0] = min(region[1], region[0] + n)
        if region[0] >= region[1]:
            self.live.popleft()


_PIECE = 32 << 20  # bytes written (and given back to the ring) at a time
_RING_MIN = 64 << 20  # a smaller arena would hold too few small tensors to keep the writer busy


def _write_file(
    backend: Backend,
    path: str,
    entries: list[HeaderEntry],
    assemble: _Assembler,
    pool: ThreadPoolExecutor,
    ring: _Ring,
    max_tasks: int,
    on_tensor: Any,
) -> None:
    """Stream one output file, assembling the next tensors while the current one is written."""
    header = encode_header(entries, HF_METADATA)
    # (entry, future, bytes of the ring it holds)
    pending: collections.deque[tuple[HeaderEntry, Future[torch.Tensor], int]] = collections.deque()
    todo = collections.deque(entries)

    def refill() -> None:
        while todo and len(pending) < max_tasks:
            e = todo[0]
            n = assemble.source_nbytes(e.name)
            out = ring.take(n) if n else None
            if out is None and n:
                if pending or ring.live:
                    return  # wait for space
                # larger than the whole ring: assemble alone in a buffer of its own
            todo.popleft()
            pending.append((e, pool.submit(assemble, e.name, e.dtype, out), n if out is not None else 0))

    try:
        with backend.open_write(path) as f:
            f.write(header)
            for e in entries:
                refill()
                queued, fut, held = pending.popleft()
                assert queued is e
                t = fut.result()
                if held and t.dtype != assemble.source_dtype(e.name):  # cast: the ring copy is done with
                    ring.give_back(held)
                    held = 0
                view = tensor_memoryview(t)
                if len(view) != e.nbytes:  # pragma: no cover - layout and assembly agree by construction
                    raise CheckpointError(f"{e.name!r}: assembled {len(view)} bytes, planned {e.nbytes}")
                for k in range(0, len(view), _PIECE):
                    piece = view[k : k + _PIECE]
                    f.write(piece)
                    if held:
                        ring.give_back(len(piece))
                        refill()
                del view, t
                on_tensor(e.nbytes)
    finally:
        for _, fut, _ in pending:
            fut.cancel()
        ring.live.clear()


def consolidate(
    src_url: str,
    dst_url: str,
    *,
    max_shard_size: int | str = "5GB",
    reference_index: str | dict[str, Any] | None = None,
    dtype_reference: str | None = None,
    cast_dtype: str | torch.dtype | None = None,
    workers: int = 4,
    process_group: Any = None,
    progress: bool = True,
    group: str | None = None,
    verify: bool = True,
    max_inflight_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    in_place: bool = False,
    config: str | dict[str, Any] | None = None,
    conversion: Any = None,
) -> dict[str, Any]:
    """Write the full tensors of the checkpoint at ``src_url`` as an HF directory at ``dst_url``.

    :param max_shard_size: bytes per output file (``"5GB"``, ``"500MB"``, an int).
    :param reference_index: a base model's ``model.safetensors.index.json`` (URL/path, its
        directory, or the parsed dict) whose file layout to mirror; overrides ``max_shard_size``.
    :param dtype_reference: a reference HF directory whose headers give each tensor's original
        dtype (restored for float tensors).
    :param cast_dtype: ``"bf16"``/``"fp16"``/``"fp32"``: cast ordinary float tensors (never ints,
        bools or fp8; tensors the reference keeps in another dtype keep it).
    :param workers: threads assembling tensors (reads overlap the write of the current tensor).
    :param max_inflight_bytes: size of the arena assembled tensors live in; default: the largest
        tensor (at least 64 MiB), so peak memory is about one tensor whatever ``workers`` is.
    :param process_group: split output files across the ranks of this group (all its ranks must
        call); ``None``: this process writes everything, with no collectives.
    :param group: which top-level state entry to export (default ``model`` when present).
    :param verify: check chunk checksums while reading.
    :param overwrite: replace a destination that is not empty (an earlier export, any directory),
        whole and atomically. Without it such a destination is refused and left untouched.
    :param in_place: write straight into ``dst_url``, a staging directory the caller owns and
        publishes itself (the consolidated-hf addon); nothing there is removed, the index is
        written last.
    :param config: where ``config.json`` (and ``generation_config.json``) come from: a config dict,
        a ``config.json`` URL/path or a directory holding one (a base model); by default the
        source's own (artifacts of the checkpoint, or an HF directory's files). Written beside the
        weights so ``from_pretrained`` loads the output as it is (not with ``in_place`` unless
        given). Without ``cast_dtype`` the weights are written in the dtype of the base model
        (``dtype_reference``'s ``config.json``) or else of the config (``dtype``/``torch_dtype``),
        and the config names the dtype written.
    :param conversion: what gives the transformers conversion to reverse (fused MoE experts -> one
        tensor per expert), when ``config`` does not: a transformers model, a ``PretrainedConfig``,
        a config dict or the bytes of a ``config.json``. For a caller that writes the config files
        itself (the consolidated-hf addon, ``in_place``); by default the conversion is the
        written ``config.json``'s, and without one the names are kept as stored.
    :returns: the index dict (``{"metadata": {"total_size"}, "weight_map"}``).
    """
    pg = process_group
    rank, world = ext.rank_and_size(pg) if pg is not None else (0, 1)
    src = _open_source(src_url, group, storage_options, verify)
    cast = parse_cast(cast_dtype)
    meta_files: dict[str, bytes] = {}
    if config is not None or not in_place:
        meta_files = hf_config_files(config, src_url, storage_options, verify)
        cast, meta_files = export_dtype(meta_files, cast, dtype_reference, storage_options)
        if CONFIG_NAME not in meta_files and rank == 0:
            log.warning(
                "%s has no %s: pass config= (--config) for a directory from_pretrained loads",
                src_url,
                CONFIG_NAME,
            )
    # the config's transformers conversion, reversed (fused MoE experts -> one tensor each on disk)
    src = hf_source_view(src, conversion if conversion is not None else meta_files.get(CONFIG_NAME))
    dtypes = reference_dtypes(dtype_reference, storage_options) if dtype_reference else None
    ref_map = None
    if reference_index is not None:
        ref = (
            reference_index
            if isinstance(reference_index, dict)
            else _read_json(reference_index, storage_options, INDEX_NAME)
        )
        ref_map = ref.get("weight_map") if isinstance(ref, dict) else None
        if not isinstance(ref_map, dict):
            raise CorruptCheckpointError("reference index has no weight_map")
    specs = {
        name: (target_dtype(name, st.meta.properties.dtype, dtypes, cast), tuple(st.meta.size))
        for name, st in src.tensors.items()
    }
    plan = make_plan(specs, max_shard_size, ref_map)
    index = index_dict(plan, specs)

    du = parse_url(dst_url)
    du, backend = open_backend(du, storage_options)
    dest = du.path.rstrip("/") or du.path
    target: Target | None = None

    def prepare() -> str:
        nonlocal target
        if in_place:
            backend.makedirs(dest)
            return dest
        target = _prepare_target(backend, dest, str(du), overwrite)
        return target.data_dir

    work = _share(prepare, pg)
    assert work is not None

    def abort() -> None:
        if target is not None:
            target.abort()

    mine = [(n, names) for i, (n, names) in enumerate(zip(plan.names, plan.files)) if i % world == rank]
    total = sum(math.prod(specs[n][1]) * specs[n][0].itemsize for _, names in mine for n in names)
    bar = _progress(total, progress and rank == 0, du)
    error: tuple[bool, str] | None = None  # (damage found, what happened on this rank)
    try:
        if verify:  # the stored chunks this rank's tensors are cut from, whole, before any is written
            verify_cut(src, (n for _, names in mine for n in names))
        assemble = _Assembler(src, verify)
        n_workers = max(1, int(workers))
        largest = max((assemble.source_nbytes(n) for n in src.tensors), default=0)
        try:
            ring = _Ring(max_inflight_bytes or max(largest, min(_RING_MIN, total)))
        except (RuntimeError, MemoryError) as exc:
            raise CheckpointError(f"consolidation cannot allocate its {largest}-byte buffer: {exc}") from exc
        with ThreadPoolExecutor(n_workers, thread_name_prefix="ckptio-consolidate") as pool:
            for fname, names in mine:
                entries = layout([(n, specs[n][0], specs[n][1]) for n in names])
                _write_file(
                    backend, backend.join(work, fname), entries, assemble, pool, ring, n_workers, bar.update
                )
    except BaseException as exc:
        error = (isinstance(exc, CorruptCheckpointError), f"rank {rank}: {type(exc).__name__}: {exc}")
        if world == 1 or not isinstance(exc, Exception):
            bar.close()
            abort()
            raise
    finally:
        bar.close()
    failures = [e for e in (ext.all_gather(error, pg) if pg is not None else [error]) if e]
    if failures:
        _on_coordinator(abort, pg)
        message = "consolidation failed: " + "; ".join(text for _, text in failures)
        if any(damaged for damaged, _ in failures):  # every rank reports the damage as damage
            raise CorruptCheckpointError(message)
        raise CheckpointError(message)

    def publish() -> None:
        try:
            for name, data in meta_files.items():
                backend.write_bytes(backend.join(work, name), data)
            backend.write_bytes(backend.join(work, INDEX_NAME), index_bytes(index))  # the index last
            if target is not None:
                target.commit(None)  # one rename on rename stores
        except BaseException:
            abort()
            raise

    _on_coordinator(publish, pg)
    return index


def _prepare_target(backend: Backend, dest: str, what: str, overwrite: bool) -> Target:
    """Where the new directory is written: a unique staging directory beside ``dest`` (rename
    stores) or ``dest`` itself, its old index removed first (marker stores)."""
    recover(backend, dest)  # an interrupted replacement is finished or undone first
    try:
        existing = backend.listdir(dest) if backend.exists(dest) else []
    except CheckpointNotFoundError:
        existing = []
    if existing and not overwrite:
        raise CheckpointError(
            f"{what} is not empty ({', '.join(sorted(existing)[:4])}{', ...' if len(existing) > 4 else ''}); "
            "consolidation never writes into a directory it does not replace: pass overwrite=True "
            "(ckptio consolidate --overwrite) to replace it whole, or choose another destination"
        )
    target = Target.prepare(
        backend,
        dest,
        overwrite=overwrite,
        what=what,
        hint="pass overwrite=True (ckptio consolidate --overwrite) to replace it",
        replace_foreign=overwrite,
    )
    if backend.commit_mode != "rename" and existing:
        # an object store has no rename: uncommit (the index goes first), then clear the prefix
        backend.remove(backend.join(dest, INDEX_NAME))
        for name in existing:
            if name != INDEX_NAME:
                backend.remove(backend.join(dest, name), recursive=True)
    return target


def _share(fn: Any, pg: Any) -> Any:
    """Run ``fn`` on the coordinator and hand its result to every rank."""
    if pg is None:
        return fn()
    return ext.on_coordinator(fn, pg, share_result=True)


def _on_coordinator(fn: Any, pg: Any) -> None:
    """Run ``fn`` on group rank 0 and share its failure; without a group, just run it (a single
    process consolidates alone even inside a distributed job)."""
    if pg is None:
        fn()
    else:
        ext.on_coordinator(fn, pg)


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int, enabled: bool, where: Any) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"consolidate -> {where}")


# -- config.json and generation_config.json -----------------------------------------------------
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_CONFIG_NAMES = (CONFIG_NAME, GENERATION_CONFIG_NAME)
#: the dtype names a config may give that a cast understands
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def _read_small(backend: Backend, path: str, what: str) -> bytes:
    return read_limited(backend, path, _MAX_JSON_BYTES, what)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def hf_config_files(
    config: str | dict[str, Any] | None,
    src_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
) -> dict[str, bytes]:
    """``config.json`` (and ``generation_config.json`` when there is one) for an HF export, by name.

    From ``config`` when given: a parsed config dict, the URL/path of a ``config.json``, or of a
    directory holding one (its ``generation_config.json`` comes along); else from the directory at
    ``src_url`` (a checkpoint whose artifacts include them, or an HF directory), checked against
    the checkpoint's manifest when it lists them. ``{}`` when neither has a config.
    """
    if isinstance(config, dict):
        return {CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    url = str(config) if config is not None else src_url
    if url is None:
        return {}
    u, backend = open_backend(url, storage_options)
    with backend:
        if config is not None and u.path.endswith(".json"):  # a config file (generation config beside it)
            sources = {CONFIG_NAME: u.path}
            if u.path.rsplit("/", 1)[-1] == CONFIG_NAME:
                sources[GENERATION_CONFIG_NAME] = backend.join(_parent(u.path), GENERATION_CONFIG_NAME)
        else:
            sources = {name: backend.join(u.path, name) for name in _CONFIG_NAMES}
        manifest = read_manifest(backend, u.path) if config is None else None
        out: dict[str, bytes] = {}
        for name, path in sources.items():
            if not backend.exists(path):
                continue
            data = _read_small(backend, path, name)
            listed = manifest.files.get(name) if manifest is not None else None
            digest = listed.get("xxh3") if isinstance(listed, dict) else None
            if verify and digest and xxhash.xxh3_64_hexdigest(data) != digest:
                raise CorruptCheckpointError(
                    f"checksum mismatch in {backend.url(path)}", path=backend.url(path)
                )
            try:
                if not isinstance(json.loads(data), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError) as exc:
                raise CorruptCheckpointError(f"{backend.url(path)} is not a JSON config ({exc})") from exc
            out[name] = data
        if config is not None and CONFIG_NAME not in out:
            raise CheckpointNotFoundError(f"no {CONFIG_NAME} at {backend.url(u.path)} (config=)")
        return out


def config_dtype(files: dict[str, bytes]) -> torch.dtype | None:
    """The model dtype a ``config.json`` names (``dtype``, or ``torch_dtype`` before transformers 5),
    ``None`` when it names none a cast understands."""
    data = files.get(CONFIG_NAME)
    if data is None:
        return None
    cfg = json.loads(data)
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if not isinstance(name, str) or name.removeprefix("torch.") not in _CONFIG_DTYPES:
        return None
    return parse_cast(_CONFIG_DTYPES[name.removeprefix("torch.")])


def with_config_dtype(files: dict[str, bytes], dtype: torch.dtype) -> dict[str, bytes]:
    """``files`` with ``config.json``'s dtype set to ``dtype`` (the dtype the weights are written
    in, so ``from_pretrained`` loads them as they are)."""
    if CONFIG_NAME not in files or config_dtype(files) == dtype:
        return files
    cfg = json.loads(files[CONFIG_NAME])
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    return {**files, CONFIG_NAME: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()}


def export_dtype(
    files: dict[str, bytes],
    cast: torch.dtype | None,
    reference: str | None = None,
    storage_options: dict[str, Any] | None = None,
    use_config: bool = True,
) -> tuple[torch.dtype | None, dict[str, bytes]]:
    """The cast of an export and its config files: an explicit ``cast`` wins; else the dtype of the
    base model (``reference``: an HF directory whose ``config.json`` names it), else (with
    ``use_config``) the one ``config.json`` names. The config is made to name the dtype chosen."""
    if cast is None and reference is not None:
        try:
            cast = config_dtype(hf_config_files(reference, storage_options=storage_options))
        except CheckpointNotFoundError:
            cast = None
    if cast is None and use_config:
        cast = config_dtype(files)
    return cast, (with_config_dtype(files, cast) if cast is not None else files)


__all__ = [
    "config_dtype",
    "consolidate",
    "export_dtype",
    "hf_config_files",
    "reference_dtypes",
    "with_config_dtype",
]
