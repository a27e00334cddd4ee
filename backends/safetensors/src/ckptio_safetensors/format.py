"""The ``safetensors`` format: DCP planning, HF safetensors files, JSON metadata in the manifest.

See the package docstring for the directory layout. The manifest's ``format_metadata`` uses the
same schema as the native format (DCP metadata as JSON plus one storage entry per chunk: file,
absolute byte position, length, xxh3-64), so the native reader's checked parsing, parallel
``read_into`` and checksum verification are reused; the safetensors headers carry the same facts
for tools that only have the files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import threading
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from ckptio.errors import CheckpointError, CorruptCheckpointError, OptionError, StateMismatchError
from ckptio.ext import (
    Backend,
    FileSizeChecker,
    Format,
    FormatReader,
    FormatWriter,
    Manifest,
    ModelState,
    TensorEntry,
    default_thread_count,
    is_first_rank,
    metadata_from_json,
    metadata_to_json,
    missing_file,
    read_limited,
    resolve_thread_count,
    split_by_size,
    tensor_entries,
    tensor_memoryview,
    tiling_problem,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlanner,
    ReadItem,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from ._buffers import band_read
from ._header import encode_header, layout, read_header, stream_tensors
from .conversion import Stored, Sym, is_transformers_model, load_plan
from .hf import INDEX_NAME, SINGLE_NAME, index_bytes
from .hf_cache import reading_backend
from .modelinit import adopt_dtypes, materialize

LAYOUT_VERSION = "ckptio-safetensors/1"
#: Default thread counts (``thread_count=None``): one writer per core available to each rank on
#: this machine, two readers per core (:func:`ckptio.ext.default_thread_count`), at most these.
MAX_DEFAULT_WRITE_THREADS = 4
MAX_DEFAULT_READ_THREADS = 8
VALUES_PREFIX = "values-rank"
SHARDING_KEY = "ckptio_sharding"  # {name: {"global_shape": [...], "offsets": [...]}} as JSON
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"  # torch's HF key, so torch's HF reader/consolidator read our files
_SAFE_GROUP = re.compile(r"^[^/\\]+$")
# the token appears on object stores (ckptio.ext.tag_file_name)
_OWN_FILE = re.compile(r"^(rank\d{5}-\d{2}|values-rank\d{5})(\.[0-9a-f]{12})?\.(safetensors|json)$")
SPLIT_BYTES = 64 << 20  # a group smaller than this is written as one file per rank
#: The largest ``model.safetensors.index.json`` read (DeepSeek-V3's, 90k weights, is ~9 MB).
MAX_INDEX_BYTES = 64 << 20


def _item_bytes(item: WriteItem) -> int:
    td = item.tensor_data
    return 0 if td is None else math.prod(td.chunk.sizes) * td.properties.dtype.itemsize


def split_fqn(fqn: str, path: tuple[Any, ...] | None) -> tuple[str, str]:
    """``(group, name)`` of a flattened DCP key: the top-level state key is the group (a directory),
    the rest of the path, dotted, is the tensor name; top-level tensors have group ``""``."""
    if not path or len(path) == 1:
        return "", fqn
    group = str(path[0])
    name = ".".join(str(p) for p in path[1:])
    if group in (".", "..") or not _SAFE_GROUP.match(group):
        raise StateMismatchError(f"top-level state key {group!r} cannot be a directory name; rename it")
    return group, name


def group_dir(group: str) -> str:
    """The directory of a group's files: the state key itself, unless it could collide with a
    file of the checkpoint (``manifest.json``, the index, ``values-rank*.json``, an addon's
    ``adapter_config.json``...: every such name has a dot), which gets a ``~`` appended. Names
    ending with ``~`` get one more, so two state keys never share a directory."""
    return f"{group}~" if "." in group or group.endswith("~") else group


def group_file(group: str, name: str) -> str:
    return f"{group_dir(group)}/{name}" if group else name


@dataclass(frozen=True, kw_only=True)
class SafetensorsSaveOptions:
    """The safetensors format's options on ``save`` (and a manager's saves)."""

    thread_count: int | None = None
    """Writer threads per rank: a group (top-level state key) of at least 64 MiB is split over
    this many files per rank, written in parallel. Default: one per core available to each rank
    on this machine, at most 4."""


@dataclass(frozen=True, kw_only=True)
class SafetensorsLoadOptions:
    """The safetensors format's options on ``load``."""

    thread_count: int | None = None
    """Reader threads per rank. Default: two per core available to each rank on this machine, at
    most 8."""
    prefix: str | None = None
    """Foreign (``save_pretrained``) directories: the state key their tensors go under
    (``"model"``: ``model.<name>``; ``""``: the top level). Default: the state's only top-level
    key when it is not itself a stored name, else the top level."""
    key_mapping: dict[str, str] | None = None
    """Foreign directories: ``{regex: replacement}`` applied to the stored names before the
    prefix (the first matching pattern wins)."""
    dtype_policy: str | None = None
    """A stored dtype that differs from the destination's: ``"cast"`` converts it while reading,
    as ``from_pretrained(dtype=...)`` does; ``"keep"``: the destination adopts the stored dtype
    (the parameter's data is replaced, as NeMo AutoModel does for a base model; not for
    DTensor/FSDP2 parameters); ``"strict"``: refused (:class:`~ckptio.StateMismatchError`).
    Default: ``"cast"`` for foreign (Hugging Face) directories, ``"strict"`` for ckptio
    checkpoints, where a resume in another dtype is a mistake unless asked for. Only floating
    dtypes are ever cast."""
    allow_overflow: bool = False
    """A cast that turns finite stored values into infinities (fp32 -> fp16 above 65504) is an
    error naming the tensor; ``True`` loads them as infinities."""
    hf_conversion: bool = True
    """Foreign directories loaded into a transformers model: apply the model's checkpoint
    conversion mapping (the one ``from_pretrained`` uses: renamed modules, MoE experts stored one
    by one and fused in memory), by ranged reads. ``False``: names as stored."""
    materialize_device: str | None = None
    """A model on the meta device is materialised (``to_empty``; each FSDP2 rank allocates only
    its own shards) and filled: on this device; default the device type of its DTensor mesh, else
    ``"cpu"``."""
    state_keys: Sequence[str] | None = field(default=None, metadata={"deprecated": True})
    """Deprecated: ckptio passes the state's top-level keys to the format itself; choose where a
    foreign directory's tensors go with ``prefix``."""

    def __post_init__(self) -> None:
        if self.dtype_policy not in (None, "cast", "keep", "strict"):
            raise OptionError(
                f"dtype_policy={self.dtype_policy!r}: expected 'cast', 'keep' or 'strict' (or None for the default)"
            )
        if self.state_keys is not None:
            warnings.warn(
                "the safetensors load option state_keys= is deprecated: ckptio passes the state's "
                "keys itself; use prefix= to choose where the tensors go",
                DeprecationWarning,
                stacklevel=4,
            )


# -- writer --------------------------------------------------------------------------------
class SafetensorsWriter(FormatWriter):
    """Every rank streams its chunks into its own safetensors files, one per group and thread."""

    def write_items(self, items: list[WriteItem], planner: SavePlanner, prefix: str) -> list[WriteResult]:
        rank = int(prefix.removeprefix("__")) if prefix.startswith("__") else self.rank
        mappings: dict[str, tuple[Any, ...]] = getattr(planner, "mappings", None) or {}
        by_group: dict[str, list[tuple[WriteItem, str]]] = defaultdict(list)
        values: list[WriteItem] = []
        seen: dict[tuple[str, str], str] = {}
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                values.append(item)
                continue
            group, name = split_fqn(item.index.fqn, mappings.get(item.index.fqn))
            other = seen.setdefault((group, name), item.index.fqn)
            if other != item.index.fqn:
                raise StateMismatchError(f"state keys {other!r} and {item.index.fqn!r} both map to {name!r}")
            by_group[group].append((item, name))
        n_threads = resolve_thread_count(
            getattr(self.options, "thread_count", None), MAX_DEFAULT_WRITE_THREADS
        )
        jobs: list[tuple[str, str, list[tuple[WriteItem, str]]]] = []
        for group, pairs in sorted(by_group.items()):
            names = {id(it): nm for it, nm in pairs}
            group_bytes = sum(_item_bytes(it) for it, _ in pairs)
            buckets = split_by_size([it for it, _ in pairs], n_threads if group_bytes >= SPLIT_BYTES else 1)
            for k, bucket in enumerate(buckets):
                fname = group_file(group, self.file_name(f"rank{rank:05d}-{k:02d}.safetensors"))
                jobs.append((fname, group, [(it, names[id(it)]) for it in bucket]))
        results: list[WriteResult] = []
        if values:
            results.extend(
                self._write_values(self.file_name(f"{VALUES_PREFIX}{rank:05d}.json"), values, planner)
            )
        if len(jobs) <= 1:
            for fname, group, pairs in jobs:
                results.extend(self._write_file(fname, group, pairs, planner))
        else:
            with ThreadPoolExecutor(min(n_threads, len(jobs)), thread_name_prefix="ckptio-st-write") as pool:
                futures = [pool.submit(self._write_file, *job, planner) for job in jobs]
                for fut in futures:
                    results.extend(fut.result())
        return results

    def _write_file(
        self, fname: str, group: str, pairs: list[tuple[WriteItem, str]], planner: SavePlanner
    ) -> list[WriteResult]:
        by_name = {name: item for item, name in pairs}
        specs = []
        sharding: dict[str, Any] = {}
        dcp_sharding: dict[str, Any] = {}
        for item, name in pairs:
            td = item.tensor_data
            assert td is not None
            specs.append((name, td.properties.dtype, tuple(td.chunk.sizes)))
            sharding[name] = {"global_shape": list(td.size), "offsets": list(td.chunk.offsets)}
            dcp_sharding[name] = {"saved_offsets": list(td.chunk.offsets)}
        entries = layout(specs)
        meta = {
            "format": "pt",
            SHARDING_KEY: json.dumps(sharding, separators=(",", ":")),
            DCP_SHARDING_KEY: json.dumps(dcp_sharding, separators=(",", ":")),
            "DCP_VERSION": "1.0",
        }
        header = encode_header(entries, meta)

        def get(e: Any) -> torch.Tensor:
            data = planner.resolve_data(by_name[e.name])
            assert isinstance(data, torch.Tensor)
            return data

        with self.backend.open_write(self.backend.join(self.path, fname)) as f:
            digests = stream_tensors(f, header, entries, get)
        start = len(header)
        file_size = start + sum(e.nbytes for e in entries)
        results = []
        for e in entries:
            item = by_name[e.name]
            info = {
                "file": fname,
                "group": group,
                "name": e.name,
                "pos": start + e.begin,
                "length": e.nbytes,
                "xxh3": digests[e.name],
                "file_size": file_size,
                "whole": tuple(item.tensor_data.size) == e.shape if item.tensor_data else True,
            }
            results.append(WriteResult(index=item.index, size_in_bytes=e.nbytes, storage_data=info))
        return results

    def _write_values(self, fname: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        """Non-tensor values as one JSON object ``{fqn: value}``; each value's byte range is
        recorded so that a load reads (and checks) just the values it needs."""
        out = io.BytesIO()
        out.write(b"{")
        spans = []
        for i, item in enumerate(items):
            data = planner.resolve_data(item)
            raw = data.getvalue() if isinstance(data, io.BytesIO) else b""
            try:
                json.loads(raw)
            except ValueError as exc:
                raise CheckpointError(
                    f"non-tensor value {item.index.fqn!r} is not JSON; save through ckptio.save (its planner "
                    "stores values as JSON), or keep only tensors in a safetensors checkpoint"
                ) from exc
            out.write((b"," if i else b"") + json.dumps(item.index.fqn).encode() + b":")
            spans.append((item, out.tell(), len(raw), xxhash.xxh3_64_hexdigest(raw)))
            out.write(raw)
        out.write(b"}\n")
        body = out.getvalue()
        with self.backend.open_write(self.backend.join(self.path, fname)) as f:
            f.write(body)
        return [
            WriteResult(
                index=item.index,
                size_in_bytes=n,
                storage_data={
                    "file": fname,
                    "name": item.index.fqn,
                    "pos": pos,
                    "length": n,
                    "xxh3": d,
                    "file_size": len(body),
                    "value": True,
                },
            )
            for item, pos, n, d in spans
        ]

    def build_metadata(
        self, metadata: Metadata, results: list[WriteResult]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        files: dict[str, dict[str, Any]] = {}
        storage = []
        names: dict[str, list[str]] = {}
        # per group directory: {tensor name: file name}, the bytes, and whether all are whole
        weight_maps: dict[str, dict[str, str]] = defaultdict(dict)
        totals: dict[str, int] = defaultdict(int)
        partial_dirs: set[str] = set()
        for r in results:
            sd = r.storage_data
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
            if sd.get("value"):
                continue
            dirname, _, base = sd["file"].rpartition("/")
            names[r.index.fqn] = [sd["group"], sd["name"]]
            weight_maps[dirname][sd["name"]] = base
            totals[dirname] += sd["length"]
            if not sd["whole"]:
                partial_dirs.add(dirname)
        # A group whose tensors are all whole is a valid HF directory: give it the HF index.
        for dirname, weight_map in sorted(weight_maps.items()):
            if dirname in partial_dirs:
                continue
            data = index_bytes(
                {"metadata": {"total_size": totals[dirname]}, "weight_map": dict(sorted(weight_map.items()))}
            )
            rel = f"{dirname}/{INDEX_NAME}" if dirname else INDEX_NAME
            self.backend.write_bytes(self.backend.join(self.path, rel), data)
            files[rel] = {"size": len(data), "xxh3": xxhash.xxh3_64_hexdigest(data)}
        fm = {"layout": LAYOUT_VERSION, "dcp": metadata_to_json(metadata), "storage": storage, "names": names}
        return fm, files


# -- readers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One stored chunk: where its bytes lie and their xxh3-64 (``None`` for foreign files)."""

    fqn: str
    offsets: tuple[int, ...] | None  # None for a non-tensor value
    sizes: tuple[int, ...] | None
    dtype: torch.dtype | None
    file: str
    pos: int
    length: int
    xxh3: str | None
    #: A box of a stored tensor seen in another dimension order (a transformers ``Transpose``):
    #: ``(stored shape, box, axes)`` as in :class:`~ckptio_safetensors.conversion.Piece`; ``pos``
    #: is then where the stored tensor starts. ``None`` for the usual run of row-major bytes.
    view: tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int | None, ...]] | None = None


ChunkTable = dict[tuple[str, tuple[int, ...] | None], Chunk]


def manifest_metadata(
    manifest: Manifest, where: str, *, require_checksums: bool = True
) -> tuple[Metadata, ChunkTable]:
    """DCP ``Metadata`` and the chunk table from a manifest.

    The core's checked parser validates every number (shapes, chunk coverage, byte ranges within
    the files); the whole-chunk checksums, which are this format's own, are checked here, and
    are required unless ``require_checksums`` is false (``verify=False`` loads, ``inspect``).
    So is ``names`` (``{fqn: [group, name in the file]}``).
    """
    fm = manifest.format_metadata
    storage = fm.get("storage") if isinstance(fm, dict) else None
    if not isinstance(storage, list) or not all(isinstance(x, dict) for x in storage):
        raise CorruptCheckpointError(f"{where}: safetensors metadata is malformed (storage)")
    stripped = {**fm, "storage": [{k: v for k, v in x.items() if k != "xxh3"} for x in storage]}
    md, entries = metadata_from_json(stripped, manifest.files, where, require_checksums=False)
    names = fm.get("names", {})
    if not isinstance(names, dict) or not all(
        type(v) is list and len(v) == 2 and type(v[0]) is str and type(v[1]) is str for v in names.values()
    ):
        raise CorruptCheckpointError(f"{where}: safetensors metadata is malformed (names)")
    hashes: dict[tuple[str, tuple[int, ...] | None], str | None] = {}
    for x in storage:
        h = x.get("xxh3")
        if h is not None and not isinstance(h, str):
            raise CorruptCheckpointError(f"{where}: bad checksum for {x.get('fqn')!r}")
        off = x.get("offsets")
        hashes[(x["fqn"], tuple(off) if isinstance(off, list) else None)] = h
    table: ChunkTable = {}
    for key, e in entries.items():
        h = hashes.get(key)
        if h is None and require_checksums:
            raise CorruptCheckpointError(
                f"{where}: {e.fqn!r} has no checksum; a committed checkpoint always has them "
                "(load with verify=False to read it unchecked)"
            )
        table[key] = Chunk(e.fqn, e.offsets, e.sizes, e.dtype, e.file, e.pos, e.length, h)
    md.storage_data = table
    return md, table


#: Bytes of stored data held at a time (per reader thread) when a tensor is cast while read.
#: Small enough to stay in the CPU cache between the read and the cast (bf16 -> fp32 into a fresh
#: model: 1 MiB bands measured as fast as 8 MiB ones and as reading in place, with a third of the
#: extra memory; 256 KiB bands were 30% slower, per-band overhead).
CAST_BAND_BYTES = 1 << 20
#: a widening read into more destination bytes than twice this is split into tasks of this size
SPLIT_BYTES = 32 << 20


class SafetensorsReader(FormatReader):
    """Fills DCP's read items from safetensors files through the backend.

    A chunk that lands whole in a contiguous CPU destination of its dtype is read straight into
    it; a resharded one is read whole (to check its checksum) or, when there is nothing to check,
    only its band of rows; one read into another dtype (``dtype_policy="cast"``) is read and cast
    band by band (:data:`CAST_BAND_BYTES` at a time). Reads run on ``thread_count`` threads;
    planner callbacks stay on the calling thread. Two destinations that are one tensor (tied
    weights) are read once.
    """

    def __init__(
        self,
        backend: Backend,
        path: str,
        metadata: Metadata,
        chunks: ChunkTable,
        files: dict[str, dict[str, Any]] | None = None,
        *,
        verify: bool = True,
        thread_count: int | None = None,
        options: SafetensorsLoadOptions | None = None,
        foreign: tuple[list[ForeignTensor], str] | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.path = path
        self.metadata = metadata
        self.chunks = chunks
        self.verify = bool(verify)
        self.thread_count = resolve_thread_count(thread_count, MAX_DEFAULT_READ_THREADS, per_core=2.0)
        #: the user chose ``thread_count``: kept as given (else casting loads use fewer, see read_data)
        self._threads_given = thread_count is not None
        self.options = options or SafetensorsLoadOptions()
        #: foreign directories: the stored tensors and the state prefix they go under
        self.foreign = foreign
        self.bytes_read = 0
        #: destination fqn -> the fqn it is read with (tied weights the checkpoint stores once)
        self.aliases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._bands: list[torch.Tensor] = []  # reused cast buffers (at most one per reader thread)
        # ``files``: the sizes a manifest declares, made true before anything is read or
        # allocated (one rank checks all, each rank those it reads). Foreign directories have
        # none: their headers are checked against the real sizes as they are parsed.
        self._sizes = FileSizeChecker(backend, path, files or {}, threads=4 * self.thread_count)
        if files is not None and is_first_rank():
            self._sizes.check(c.file for c in chunks.values())

    # -- fitting the checkpoint to the state --------------------------------------------------
    def bind_state(self, state: dict[str, Any], expanded: dict[str, Any]) -> None:
        """Called by ckptio with the state before DCP plans: a foreign directory's names follow
        the model's transformers conversion, tied weights stored once are read for both names, and
        stored dtypes that differ are cast or refused (``dtype_policy``)."""
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        flat, _ = flatten_state_dict(expanded)
        dest = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        self.layout(state, dest)
        self._apply_dtype_policy(dest)

    def layout(self, state: dict[str, Any], dest: dict[str, torch.Tensor]) -> None:
        """Names and aliases of the stored tensors for the destinations ``dest`` (flat fqns)."""
        if self.foreign is not None:
            tensors, prefix = self.foreign
            model = _model_under(state, prefix)
            whole = all(not any(t.offsets) for t in tensors)
            if self.options.hf_conversion and whole and is_transformers_model(model):
                rel = {k[len(prefix) :]: tuple(v.shape) for k, v in dest.items() if k.startswith(prefix)}
                syms = load_plan(model, [t.stored for t in tensors], rel)
                self.metadata, self.chunks = _converted_table(self.backend.url(self.path), syms, prefix)
            self._alias_tied(dest)

    def _alias_tied(self, dest: dict[str, torch.Tensor]) -> None:
        """A destination the checkpoint lacks that is the same memory as one it has (a tied
        ``lm_head``: ``save_pretrained`` stores it once) is read from its twin's entry."""
        sdm = self.metadata.state_dict_metadata
        by_memory: dict[tuple[Any, ...], str] = {}
        for fqn, t in dest.items():
            if fqn in sdm and (key := _memory_key(t)) is not None:
                by_memory.setdefault(key, fqn)
        for fqn, t in dest.items():
            if fqn in sdm or (key := _memory_key(t)) is None or key not in by_memory:
                continue
            twin = by_memory[key]
            sdm[fqn] = sdm[twin]
            for (cfqn, off), c in list(self.chunks.items()):
                if cfqn == twin:
                    self.chunks[(fqn, off)] = dataclasses.replace(c, fqn=fqn)
            self.aliases[fqn] = twin

    def _apply_dtype_policy(self, dest: dict[str, torch.Tensor]) -> None:
        policy = self.options.dtype_policy or ("cast" if self.foreign is not None else "strict")
        sdm = self.metadata.state_dict_metadata
        refused = []
        for fqn, md in list(sdm.items()):
            t = dest.get(fqn)
            if not isinstance(md, TensorStorageMetadata) or t is None or md.properties.dtype == t.dtype:
                continue
            stored = md.properties.dtype
            if policy == "cast" and stored.is_floating_point and t.dtype.is_floating_point:
                sdm[fqn] = _tensor_md(
                    t.dtype, tuple(md.size), [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
                )
            elif self.foreign is not None:  # ckptio checkpoints: the planner reports it with shapes
                refused.append(f"{fqn}: stored {stored}, state {t.dtype}")
        if refused:
            hint = (
                "only floating dtypes are cast"
                if policy == "cast"
                else f"dtype_policy={policy!r}; pass dtype_policy='cast' to convert while loading"
            )
            raise StateMismatchError(
                f"checkpoint does not match the state: dtypes differ ({hint}): " + "; ".join(refused[:20]),
                mismatched=[r.split(":", 1)[0] for r in refused],
            )

    # -- reading ------------------------------------------------------------------------------
    def _chunk(self, req: ReadItem) -> Chunk:
        off = tuple(req.storage_index.offset) if req.storage_index.offset is not None else None
        return self.chunks[(req.storage_index.fqn, off)]

    def read_data(self, plan: Any, planner: LoadPlanner) -> torch.futures.Future[None]:
        jobs: list[tuple[ReadItem, Chunk, torch.Tensor | None]] = []
        done_once: dict[tuple[Any, ...], int] = {}
        same: list[tuple[ReadItem, torch.Tensor]] = []  # a tied destination already being read
        todo = sorted(((self._chunk(r), r) for r in plan.items), key=lambda cr: (cr[0].file, cr[0].pos))
        if self._sizes.files:
            self._sizes.check(c.file for c, _ in todo)
        for c, req in todo:
            dst = None if req.type == LoadItemType.BYTE_IO else planner.resolve_tensor(req)
            if dst is not None and (mem := _memory_key(dst)) is not None:
                key = (c.file, c.pos, tuple(req.storage_offsets), tuple(req.lengths), mem)
                if key in done_once:
                    same.append((req, dst))
                    continue
                done_once[key] = len(jobs)
            jobs.append((req, c, dst))
        # a large widening cast is split into bands of rows, each its own task: one 250 MB embedding
        # read and widened by one thread would leave the others idle at the end of the load
        tasks: list[tuple[ReadItem, Chunk, torch.Tensor | None, tuple[int, int] | None]] = []
        for req, c, dst in jobs:
            parts = self._widen_parts(req, c, dst) if self.thread_count > 1 else None
            if parts is None:
                tasks.append((req, c, dst, None))
            else:
                tasks.extend((req, c, dst, part) for part in parts)
        threads = self._threads_for(jobs)
        if threads == 1 or len(tasks) <= 1:
            done = [self._read(*task) for task in tasks]
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="ckptio-st-read") as pool:
                done = [f.result() for f in [pool.submit(self._read, *task) for task in tasks]]
        for (req, _c, dst, part), value in zip(tasks, done):
            if dst is None:
                assert value is not None
                planner.load_bytes(req, io.BytesIO(value))
            elif part is None or part[0] + part[1] == req.lengths[0]:  # a split one: its last band
                planner.commit_tensor(req, dst)
        for req, dst in same:
            planner.commit_tensor(req, dst)
        self._bands.clear()
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _threads_for(self, jobs: list[tuple[ReadItem, Chunk, torch.Tensor | None]]) -> int:
        """Reader threads for this plan. Two per core by default, so that reads waiting on a cold
        disk or an object store overlap; but a load that is mostly casts from a local file system
        (an HF bf16 directory into an fp32 model) is CPU work, and more threads than cores only
        contend: one per core there (bench_hf_load, 2 cores: 4 threads 0.66 s, 2 threads 0.61 s)."""
        if self._threads_given or self.backend.local_path(self.path) is None:
            return self.thread_count
        cast = sum(c.length for _, c, dst in jobs if dst is not None and dst.dtype != c.dtype)
        if 2 * cast <= sum(c.length for _, c, _ in jobs):
            return self.thread_count
        return min(self.thread_count, default_thread_count(MAX_DEFAULT_READ_THREADS))

    def _check(self, c: Chunk, buf: memoryview | bytes) -> None:
        if self.verify and c.xxh3 is not None and xxhash.xxh3_64_hexdigest(buf) != c.xxh3:
            url = self.backend.url(self.backend.join(self.path, c.file))
            raise CorruptCheckpointError(
                f"checksum mismatch in {url} (tensor {c.fqn!r}): the file is damaged", path=url
            )

    def _read(
        self, req: ReadItem, c: Chunk, dst: torch.Tensor | None, part: tuple[int, int] | None = None
    ) -> bytes | None:
        try:
            if part is not None:
                assert dst is not None
                fpath = self.backend.join(self.path, c.file)
                self._read_cast(fpath, req, c, dst.narrow(0, part[0], part[1]), False, first=part[0])
                return None
            return self._read_chunk(req, c, dst)
        except FileNotFoundError as exc:  # a listed file deleted since it was checked
            raise missing_file(self.backend, self.backend.join(self.path, c.file), exc) from exc

    def _widen_parts(self, req: ReadItem, c: Chunk, dst: torch.Tensor | None) -> list[tuple[int, int]] | None:
        """``(first row, rows)`` bands of a widening read (see :meth:`_read_cast`) of at least
        :data:`SPLIT_BYTES` of destination each, or None when it is read as one task (small,
        checksummed: the hash runs over the whole chunk in order, or not a widening)."""
        if (
            dst is None
            or c.view is not None
            or c.sizes is None
            or c.dtype is None
            or len(c.sizes) == 0
            or dst.dtype == c.dtype
            or (self.verify and c.xxh3 is not None)
            or dst.device.type != "cpu"
            or not dst.is_contiguous()
            or dst.nbytes < 2 * SPLIT_BYTES
            or any(req.storage_offsets[1:])
            or tuple(req.lengths[1:]) != c.sizes[1:]
            or not _widens(c.dtype, dst.dtype)
        ):
            return None
        rows = int(req.lengths[0])
        if dst.shape[0] != rows:
            return None
        per_row = max(1, dst.nbytes // max(1, rows))
        step = max(1, SPLIT_BYTES // per_row)
        if rows < 2 * step:
            return None
        return [(r, min(step, rows - r)) for r in range(0, rows, step)]

    def _read_chunk(self, req: ReadItem, c: Chunk, dst: torch.Tensor | None) -> bytes | None:
        fpath = self.backend.join(self.path, c.file)
        if dst is None:
            data = self.backend.read_bytes(fpath, c.pos, c.length)
            if len(data) != c.length:
                raise CorruptCheckpointError(
                    f"{self.backend.url(fpath)} is truncated", path=self.backend.url(fpath)
                )
            self._check(c, data)
            self._count(c.length)
            return data
        assert c.sizes is not None and c.dtype is not None
        if c.view is not None:
            self._read_view(fpath, req, c, dst)
            return None
        whole = tuple(req.lengths) == c.sizes and not any(req.storage_offsets)
        checked = self.verify and c.xxh3 is not None
        if whole and dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == c.dtype:
            view = tensor_memoryview(dst)
            if len(view):
                self.backend.read_into(fpath, c.pos, view)
            self._check(c, view)
            self._count(c.length)
            return None
        if dst.dtype != c.dtype and c.sizes and (whole or not checked):
            self._read_cast(fpath, req, c, dst, checked)
            return None
        if checked or not c.sizes:
            tmp = torch.empty(c.sizes, dtype=c.dtype)
            view = tensor_memoryview(tmp)
            if len(view):
                self.backend.read_into(fpath, c.pos, view)
            self._check(c, view)
            src = tmp
            for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                src = src.narrow(dim, o, n)
            nbytes = c.length
        else:
            src, nbytes = band_read(
                self.backend, fpath, c.pos, c.dtype, c.sizes, tuple(req.storage_offsets), tuple(req.lengths)
            )
        self._copy(dst, src, c.fqn)
        self._count(nbytes)
        return None

    def _read_cast(
        self, fpath: str, req: ReadItem, c: Chunk, dst: torch.Tensor, checked: bool, first: int = 0
    ) -> None:
        """Read the request's rows of ``c`` a band at a time into a reused buffer and cast each
        band into ``dst``: memory stays at one band per reader thread whatever the tensor's size
        (fresh buffers per band would leave glibc's arenas holding hundreds of MB), and each band
        is cast while it is still in the CPU cache. A whole chunk with a checksum is hashed band by
        band on the way (a partial one never gets here). ``dst`` may be a band of the request's
        rows starting ``first`` rows in (see :meth:`_widen_parts`)."""
        assert c.sizes is not None and c.dtype is not None
        offs, lens = tuple(req.storage_offsets), tuple(req.lengths)
        rows = int(dst.shape[0])  # the request's rows (lens[0]), or a band of them
        row = math.prod(c.sizes[1:]) * c.dtype.itemsize
        step = max(1, CAST_BAND_BYTES // max(1, row))
        h = xxhash.xxh3_64() if checked else None
        buf = self._take_band(min(step, rows) * row)
        try:
            for r in range(0, rows, step):
                n = min(step, rows - r)
                band = buf[: n * row].view(c.dtype).view(n, *c.sizes[1:])
                if band.numel():
                    at = c.pos + (offs[0] + first + r) * row
                    self.backend.read_into(fpath, at, tensor_memoryview(band))
                if h is not None:
                    h.update(tensor_memoryview(band))
                src = band
                for dim in range(1, len(c.sizes)):
                    src = src.narrow(dim, offs[dim], lens[dim])
                self._copy(dst.narrow(0, r, n), src, c.fqn)
                self._count(n * row)
        finally:
            self._give_band(buf)
        if h is not None and h.hexdigest() != c.xxh3:
            url = self.backend.url(fpath)
            raise CorruptCheckpointError(
                f"checksum mismatch in {url} (tensor {c.fqn!r}): the file is damaged", path=url
            )

    def _take_band(self, nbytes: int) -> torch.Tensor:
        """A byte buffer of at least ``nbytes`` (a band), reused across bands and threads."""
        with self._lock:
            for i, b in enumerate(self._bands):
                if b.numel() >= nbytes:
                    return self._bands.pop(i)
        return torch.empty(max(nbytes, min(CAST_BAND_BYTES, 1 << 20)), dtype=torch.uint8)

    def _give_band(self, buf: torch.Tensor) -> None:
        if buf.numel() <= CAST_BAND_BYTES:  # a one-off buffer for a huge row goes back to the OS
            with self._lock:
                self._bands.append(buf)

    def _read_view(self, fpath: str, req: ReadItem, c: Chunk, dst: torch.Tensor) -> None:
        """A box of a stored tensor in another dimension order: read the stored rows that hold
        the requested part, put the dimensions in the destination's order, copy."""
        assert c.view is not None and c.dtype is not None
        shape, sel, axes = c.view
        starts = [s for s, _ in sel]
        lens = [1] * len(shape)
        for d, a in enumerate(axes):
            if a is not None:
                starts[a] += req.storage_offsets[d]
                lens[a] = req.lengths[d]
        region, nbytes = band_read(self.backend, fpath, c.pos, c.dtype, shape, tuple(starts), tuple(lens))
        mapped = [a for a in axes if a is not None]
        order = mapped + [j for j in range(len(shape)) if j not in mapped]
        src = region.permute(*order).reshape([lens[a] for a in mapped])
        for d, a in enumerate(axes):
            if a is None:
                src = src.unsqueeze(d)
        self._copy(dst, src, c.fqn)
        self._count(nbytes)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, fqn: str) -> None:
        """``dst.copy_(src)``; a cast that would turn finite values into infinities is refused
        unless ``allow_overflow``."""
        if (
            dst.dtype != src.dtype
            and not self.options.allow_overflow
            and src.dtype.is_floating_point
            and dst.dtype.is_floating_point
            and torch.finfo(dst.dtype).max < torch.finfo(src.dtype).max
        ):
            cast = src.to(dst.dtype)
            bad = torch.isinf(cast) & torch.isfinite(src)
            if bool(bad.any()):
                worst = float(src[bad].abs().max())
                raise StateMismatchError(
                    f"casting {fqn!r} from {src.dtype} to {dst.dtype} would overflow: {int(bad.sum())} finite "
                    f"values (up to {worst:.4g}) exceed the largest {dst.dtype} ({torch.finfo(dst.dtype).max:.4g}); "
                    "load into a wider dtype, use dtype_policy='keep', or pass allow_overflow=True to load them "
                    "as infinities",
                    mismatched=[fqn],
                )
            src = cast
        dst.copy_(src)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n


def _widens(stored: torch.dtype, dest: torch.dtype) -> bool:
    """A cast to a floating dtype at least twice as wide, which never overflows (bf16/fp16 -> fp32)."""
    return (
        stored.is_floating_point
        and dest.is_floating_point
        and dest.itemsize >= 2 * stored.itemsize
        and torch.finfo(dest).max >= torch.finfo(stored).max
    )


def _memory_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies the memory of ``t`` (a DTensor's local shard), or ``None`` on meta."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if local.device.type == "meta" or local.numel() == 0:
        return None
    return (
        local.device,
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        tuple(local.stride()),
        local.dtype,
    )


def _model_under(state: dict[str, Any], prefix: str) -> Any:
    """The single model of the state entry a foreign directory goes under (``None`` if none)."""
    key = prefix[:-1] if prefix.endswith(".") else prefix
    value = state.get(key) if key else None
    if isinstance(value, ModelState):
        parts = getattr(value, "parts", None) or [value.model]
        return parts[0] if len(parts) == 1 else None
    return None


def _hash_range(backend: Backend, fpath: str, pos: int, length: int, digest: str | None) -> bool:
    """Whether ``length`` bytes at ``pos`` are all there and hash to ``digest``, read in 16 MiB
    pieces (a multi-GB tensor is never held whole)."""
    h = xxhash.xxh3_64()
    try:
        for off in range(0, length, _VERIFY_PIECE):
            n = min(_VERIFY_PIECE, length - off)
            data = backend.read_bytes(fpath, pos + off, n)
            if len(data) != n:
                return False
            h.update(data)
    except FileNotFoundError as exc:
        raise missing_file(backend, fpath, exc) from exc
    return h.hexdigest() == digest


_VERIFY_PIECE = 16 << 20


def hf_files(backend: Backend, path: str) -> list[str]:
    """The safetensors files of an HF-style directory: those the index names, else
    ``model.safetensors``, else every ``*.safetensors`` at the top level."""
    idx = backend.join(path, INDEX_NAME)
    if backend.exists(idx):
        where = backend.url(idx)
        raw = read_limited(backend, idx, MAX_INDEX_BYTES, "safetensors index")
        try:
            weight_map = json.loads(raw)["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:
                backend.join(path, f)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{where}: not a valid safetensors index ({exc})", path=where
            ) from exc
        return files
    if backend.exists(backend.join(path, SINGLE_NAME)):
        return [SINGLE_NAME]
    return sorted(n for n in backend.listdir(path) if n.endswith(".safetensors"))


def _apply_mapping(name: str, mapping: list[tuple[re.Pattern[str], str]]) -> tuple[str, bool]:
    for pattern, repl in mapping:
        new, n = pattern.subn(repl, name)
        if n:
            return new, True
    return name, False


@dataclass(frozen=True)
class ForeignTensor:
    """A tensor (or a chunk of one) of a foreign directory: its name after ``key_mapping``, where
    it lies, and its offsets in the whole tensor (non-zero only in sharded, manifest-less dirs)."""

    stored: Stored
    offsets: tuple[int, ...]


def foreign_tensors(
    backend: Backend, path: str, key_mapping: dict[str, str] | None = None
) -> list[ForeignTensor]:
    """The tensors of an HF-style directory, from its safetensors headers (``key_mapping``
    applied: a mapping that matches no stored name is an error, not a silent no-op)."""
    mapping = [(re.compile(p), r) for p, r in (key_mapping or {}).items()]
    files = hf_files(backend, path)
    if not files:
        raise CorruptCheckpointError(f"{backend.url(path)} holds no .safetensors files")
    out: list[ForeignTensor] = []
    matched = False
    for f in files:
        fpath = backend.join(path, f)
        hdr = read_header(backend, fpath)
        sharding: dict[str, Any] = {}
        for key in (SHARDING_KEY, DCP_SHARDING_KEY):
            if key in hdr.metadata:
                try:
                    sharding = json.loads(hdr.metadata[key])
                except ValueError:
                    sharding = {}
                break
        for name, he in hdr.entries.items():
            mapped, hit = _apply_mapping(name, mapping)
            matched = matched or hit
            info = sharding.get(name) or {}
            off = info.get("offsets", info.get("saved_offsets")) if isinstance(info, dict) else None
            offsets = (
                tuple(off)
                if isinstance(off, list)
                and len(off) == len(he.shape)
                and all(type(o) is int and 0 <= o < 1 << 62 for o in off)
                else (0,) * len(he.shape)
            )
            out.append(
                ForeignTensor(Stored(mapped, he.shape, he.dtype, f, hdr.data_start + he.begin), offsets)
            )
    if mapping and not matched:
        names = sorted(t.stored.name for t in out)
        raise CheckpointError(
            f"key_mapping {sorted(key_mapping or {})} matches none of the {len(names)} tensors of "
            f"{backend.url(path)} (e.g. {', '.join(names[:3])}); patterns are regular expressions searched in the "
            "stored names"
        )
    return out


def _tensor_md(
    dtype: torch.dtype, size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> Any:
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype),
        size=torch.Size(size),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks],
    )


def _foreign_table(where: str, tensors: list[ForeignTensor], prefix: str) -> tuple[Metadata, ChunkTable]:
    """DCP metadata and chunk table, names as stored (after ``key_mapping``) under ``prefix``."""
    chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]] = defaultdict(list)
    entries: ChunkTable = {}
    for t in tensors:
        st, offsets = t.stored, t.offsets
        fqn = prefix + st.name
        if (fqn, offsets) in entries:
            raise CorruptCheckpointError(f"{where}: tensor {fqn!r} is stored twice ({st.file})")
        chunks[fqn].append((offsets, st.shape, st.dtype))
        entries[(fqn, offsets)] = Chunk(
            fqn, offsets, st.shape, st.dtype, st.file, st.pos, math.prod(st.shape) * st.dtype.itemsize, None
        )
    sdm: dict[str, Any] = {}
    for fqn, parts in chunks.items():
        dtypes = {dt for _, _, dt in parts}
        if len(dtypes) != 1:
            raise CorruptCheckpointError(f"{where}: chunks of {fqn!r} have different dtypes")
        ndim = len(parts[0][1])
        if any(len(s) != ndim for _, s, _ in parts):
            raise CorruptCheckpointError(f"{where}: chunks of {fqn!r} have different ranks")
        size = tuple(max(o[d] + s[d] for o, s, _ in parts) for d in range(ndim))
        if sum(math.prod(s) for _, s, _ in parts) != math.prod(size) or tiling_problem(
            size, [(o, s) for o, s, _ in parts]
        ):
            raise CorruptCheckpointError(f"{where}: the chunks of {fqn!r} do not tile the tensor")
        sdm[fqn] = _tensor_md(dtypes.pop(), size, [(o, s) for o, s, _ in parts])
    return Metadata(state_dict_metadata=sdm, storage_data=entries), entries


def _converted_table(where: str, syms: dict[str, Sym], prefix: str) -> tuple[Metadata, ChunkTable]:
    """DCP metadata and chunk table for tensors described by a conversion plan: every piece is a
    chunk, read as a plain byte run when it is one (the usual case), else through its view."""
    sdm: dict[str, Any] = {}
    entries: ChunkTable = {}
    for name, sym in syms.items():
        fqn = prefix + name
        pieces = [p for p in sym.pieces if p.numel]
        dtypes = {p.src.dtype for p in pieces}
        if len(dtypes) > 1:
            raise CorruptCheckpointError(f"{where}: the tensors that make up {fqn!r} have different dtypes")
        dtype = dtypes.pop() if dtypes else sym.pieces[0].src.dtype
        boxes = [(p.offsets, p.sizes) for p in pieces]
        if sum(math.prod(s) for _, s in boxes) != math.prod(sym.shape) or tiling_problem(sym.shape, boxes):
            raise CorruptCheckpointError(
                f"{where}: the stored tensors that make up {fqn!r} {list(sym.shape)} do not tile it "
                "(an expert or a part missing from the checkpoint?)"
            )
        for p in pieces:
            rng = p.contiguous_range()
            if rng is not None:
                c = Chunk(fqn, p.offsets, p.sizes, dtype, p.src.file, p.src.pos + rng[0], rng[1], None)
            else:
                nbytes = p.numel * dtype.itemsize
                c = Chunk(
                    fqn,
                    p.offsets,
                    p.sizes,
                    dtype,
                    p.src.file,
                    p.src.pos,
                    nbytes,
                    None,
                    (p.src.shape, p.sel, p.axes),
                )
            entries[(fqn, p.offsets)] = c
        sdm[fqn] = _tensor_md(dtype, sym.shape, boxes)
    return Metadata(state_dict_metadata=sdm, storage_data=entries), entries


def foreign_metadata(
    backend: Backend, path: str, key_mapping: dict[str, str] | None = None, prefix: str = ""
) -> tuple[Metadata, ChunkTable]:
    """DCP ``Metadata`` and chunk entries from the headers of an HF-style directory."""
    return _foreign_table(backend.url(path), foreign_tensors(backend, path, key_mapping), prefix)


def _foreign_prefix(prefix: str | None, state_keys: Sequence[str], stored: set[str]) -> str:
    """Where a foreign directory's tensors go in the state: ``prefix=`` when given; else, when the
    state has one top-level entry that is not itself a stored name (``{"model": ModelState(m)}``),
    under that entry; else at the top level (a flat dict of tensors)."""
    if prefix is not None:
        p = str(prefix)
        return p if not p or p.endswith(".") else p + "."
    keys = list(state_keys)
    if len(keys) == 1 and keys[0] not in stored:
        return keys[0] + "."
    return ""


def _model_states(state: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in state.items() if isinstance(v, ModelState)]


def _modules(ms: Any) -> list[torch.nn.Module]:
    return list(getattr(ms, "parts", None) or [ms.model])


class SafetensorsFormat(Format):
    """HF safetensors files, sharded by rank, resharding on load (see the package docstring)."""

    name = "safetensors"
    save_options = SafetensorsSaveOptions
    load_options = SafetensorsLoadOptions

    def storage_writer(
        self, backend: Backend, path: str, options: Any = None, *, progress: bool | None = None
    ) -> SafetensorsWriter:
        return SafetensorsWriter(backend, path, options or SafetensorsSaveOptions(), progress=progress)

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
    ) -> SafetensorsReader:
        opts: SafetensorsLoadOptions = options or SafetensorsLoadOptions()
        threads = opts.thread_count
        if manifest is not None:
            md, chunks = manifest_metadata(manifest, backend.url(path), require_checksums=verify)
            return SafetensorsReader(
                backend, path, md, chunks, manifest.files, verify=verify, thread_count=threads, options=opts
            )
        backend = reading_backend(backend, path)  # a hub snapshot: its links into blobs/ are followed
        keys = opts.state_keys if opts.state_keys is not None else state_keys
        tensors = foreign_tensors(backend, path, opts.key_mapping)
        prefix = _foreign_prefix(opts.prefix, keys, {t.stored.name for t in tensors})
        md, chunks = _foreign_table(backend.url(path), tensors, prefix)
        return SafetensorsReader(
            backend,
            path,
            md,
            chunks,
            verify=verify,
            thread_count=threads,
            options=opts,
            foreign=(tensors, prefix),
        )

    def prepare_load(
        self,
        state: dict[str, Any],
        *,
        backend: Backend,
        path: str,
        manifest: Manifest | None,
        options: Any = None,
        process_group: Any = None,
    ) -> None:
        """Called by ckptio before the state's models are asked for their state dicts: with
        ``dtype_policy="keep"`` parameters adopt their stored dtypes, then models on the meta
        device are materialised (see :func:`materialize`)."""
        opts: SafetensorsLoadOptions = options or SafetensorsLoadOptions()
        models = _model_states(state)
        if not models:
            return
        if opts.dtype_policy == "keep":
            reader = self.storage_reader(
                backend, path, manifest, opts, verify=False, state_keys=list(state), progress=False
            )
            from torch.distributed.checkpoint._nested_dict import flatten_state_dict

            dest, _ = flatten_state_dict({k: ms.state_dict() for k, ms in models})
            reader.layout(state, {k: v for k, v in dest.items() if isinstance(v, torch.Tensor)})
            stored = {
                fqn: md.properties.dtype
                for fqn, md in reader.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)
            }
            for key, ms in models:
                for module in _modules(ms):
                    adopt_dtypes(
                        module, {k[len(key) + 1 :]: v for k, v in stored.items() if k.startswith(key + ".")}
                    )
        for _, ms in models:
            for module in _modules(ms):
                materialize(module, opts.materialize_device)

    def detect(self, backend: Backend, path: str) -> bool:
        """A foreign HF-style directory. ckptio's own files without a manifest are an interrupted
        save (on object stores data lands in place before the manifest): never load those."""
        names = backend.listdir(path)
        if any(_OWN_FILE.match(n) for n in names):
            return False
        if INDEX_NAME in names or SINGLE_NAME in names:
            return True
        return any(n.endswith(".safetensors") for n in names)

    def verify(self, backend: Backend, path: str, manifest: Manifest) -> int:
        where = backend.url(path)
        md, entries = manifest_metadata(manifest, where)
        FileSizeChecker(backend, path, manifest.files).check(manifest.files)
        headers = {}
        for name in manifest.files:
            if name.endswith(".safetensors"):
                headers[name] = read_header(backend, backend.join(path, name))
        names = manifest.format_metadata.get("names", {})
        checked = 0
        for e in sorted(entries.values(), key=lambda e: (e.file, e.pos)):
            fpath = backend.join(path, e.file)
            if e.file in headers:
                he = headers[e.file].entries.get(names.get(e.fqn, ["", e.fqn])[1])
                if he is None or headers[e.file].data_start + he.begin != e.pos or he.nbytes != e.length:
                    raise CorruptCheckpointError(
                        f"{backend.url(fpath)}: header does not match the manifest for {e.fqn!r}",
                        path=backend.url(fpath),
                    )
            if not _hash_range(backend, fpath, e.pos, e.length, e.xxh3):
                raise CorruptCheckpointError(
                    f"checksum mismatch in {backend.url(fpath)} (tensor {e.fqn!r}): the file is damaged",
                    path=backend.url(fpath),
                )
            checked += e.length
        return checked

    def tensors(self, backend: Backend, path: str, manifest: Manifest | None) -> list[TensorEntry]:
        if manifest is None:
            md, entries = foreign_metadata(reading_backend(backend, path), path)
        else:
            md, entries = manifest_metadata(manifest, backend.url(path), require_checksums=False)
        return tensor_entries(md, entries.values())


__all__ = [
    "Chunk",
    "SafetensorsFormat",
    "SafetensorsLoadOptions",
    "SafetensorsReader",
    "SafetensorsSaveOptions",
    "SafetensorsWriter",
    "foreign_metadata",
    "manifest_metadata",
]
