"""``ckptio.copy``: copy a checkpoint between URLs and formats, streaming, published atomically.

Why it is a library function and not only ``ckptio cp``: archiving a step to another store or
exporting it as safetensors is something training scripts and pipelines do too, and they need
the same guarantees as the command line: nothing is published that was not verified, an
existing checkpoint is replaced only when asked, and a crash leaves the old destination or the
new one (the commit protocol, :mod:`ckptio.commit`).

Two ways, chosen by the formats:

* **Same format** (and not ``full``): the files are streamed as they are, in 8 MiB pieces, from
  any backend to any backend, and the source's manifest, byte-identical, is committed last.
  Layout, ranks and checksums are unchanged; every checksum is verified on the copy before it is
  published, so a damaged or forged source publishes nothing.
* **Another format** (or ``full``): the checkpoint is saved anew with one rank and full
  (unsharded) tensors. It streams: the new checkpoint is planned from the source's metadata
  with placeholders (tensors on the ``meta`` device, which hold no memory), and each tensor is
  read from the source only when the destination's writer asks for it, then dropped once
  written.

**Memory bound of a conversion.** Besides the non-tensor values (JSON, small), at most
``2 * thread_count + 1`` source tensors are in memory at once: the destination format's writer
threads (``thread_count``, 2 by default) each hold the tensor being written (the native writer
briefly also the previous one) while one more is read. Tensors of 1 MiB or less are read in
batches, into a cache of at most 32 MiB. So the peak is a few of the largest tensors plus
32 MiB, whatever the size of the checkpoint; only the largest tensor has to fit in memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from .errors import CheckpointError, CorruptCheckpointError, InvalidURLError, translate
from .planner import SafeSavePlanner
from .reading import Located, Source, locate

log = logging.getLogger("ckptio.copy")

#: Pieces in which a same-format copy streams each file.
COPY_CHUNK = 8 << 20
#: Tensors up to this size are read in batches during a conversion...
SMALL_TENSOR_BYTES = 1 << 20
#: ...into a cache of at most this many bytes.
PREFETCH_BYTES = 32 << 20
_HINT = "pass overwrite=True (ckptio cp --overwrite) to replace it"


@dataclass
class CopyResult:
    """What :func:`copy` did.

    :ivar mode: ``"files"`` (copied as they are) or ``"convert"`` (saved anew).
    :ivar bytes: bytes written at the destination (data files and artifacts).
    :ivar bytes_read: bytes read from the source.
    :ivar files: files written.
    :ivar artifacts: files written by addons that a conversion carried over.
    :ivar step: the source's step (also the copy's).
    :ivar via_root: the series root the source was found under, if any.
    """

    src: str
    dst: str
    mode: str
    format: str
    bytes: int
    bytes_read: int
    files: int
    artifacts: list[str] = field(default_factory=list)
    step: int | None = None
    via_root: str | None = None
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def copy(
    src: str,
    dst: str,
    *,
    format: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    verify: bool = True,
    step: int | None = None,
    full: bool = False,
    progress: bool | None = None,
    **format_options: Any,
) -> CopyResult:
    """Copy the checkpoint at ``src`` to ``dst``, converting it when the formats differ.

    :param src: a committed checkpoint, a checkpoint a format recognises (a ``save_pretrained``
        directory), or a :class:`~ckptio.CheckpointManager` root (its newest committed step, or
        ``step``).
    :param dst: where to publish the copy. Its format: ``format``, else the ``fmt+`` prefix of
        ``dst`` (``safetensors+s3://bucket/export``), else the source's.
    :param overwrite: replace a committed checkpoint at ``dst``. A location holding files that
        are not a ckptio checkpoint (a run root, another tool's output) is never replaced.
    :param storage_options: backend options shared by both sides: both get them when they use
        the same storage (scheme); otherwise they go to the side that is not a local path (the
        source when both are remote), since backends refuse options they do not know.
    :param dst_storage_options: backend options for ``dst`` only, merged over the shared ones.
    :param verify: check every checksum of the source (a same-format copy checks the copy
        against the manifest before publishing it; a conversion checks each chunk as it reads
        it). ``False`` still checks every size.
    :param full: save anew (full, unsharded tensors, one rank) even when the format is unchanged.
    :param progress: ``False`` hides progress bars; ``None`` lets the terminal decide.
    :param format_options: options of the destination format's writer (``thread_count``...).
    :returns: a :class:`CopyResult`.
    :raises CheckpointError: missing or damaged source, refused destination, storage failure.
        The step, metrics and metadata of the source are kept; so are files written by addons.
    """
    from .checkpoint import build_format_options, open_backend
    from .plugins import get_format
    from .url import parse_url

    t0 = time.perf_counter()
    dst_url = parse_url(dst)
    src_opts, dst_opts = _split_options(
        parse_url(src).scheme, dst_url.scheme, storage_options or {}, dst_storage_options or {}
    )
    loc = locate(src, step=step, storage_options=src_opts, recover=True)
    try:
        src_fmt = loc.manifest.format if loc.manifest is not None else loc.fmt.name
        fmt = get_format(format or dst_url.format or src_fmt)  # a missing format fails before any write
        fopts = build_format_options(fmt, "save", format_options)
        if dst_url.storage_url == loc.url.storage_url:
            raise InvalidURLError("source and destination are the same location")
        dst_url, dst_backend = open_backend(dst_url, dst_opts)
        with dst_backend:
            if dst_url.storage_url == loc.url.storage_url:  # the same place once links are resolved
                raise InvalidURLError("source and destination are the same location")
            try:
                if fmt.name == src_fmt and loc.manifest is not None and not full:
                    info = _copy_files(loc, dst_url, dst_backend, overwrite, verify, progress)
                else:
                    info = _convert(loc, dst_url, dst_backend, fmt, fopts, overwrite, verify, progress)
            except CheckpointError:
                raise
            except (
                ValueError,
                TypeError,
                KeyError,
                IndexError,
                OverflowError,
                RecursionError,
                MemoryError,
            ) as exc:
                # hostile or damaged metadata that slipped past the format's checks: still a ckptio error
                raise CheckpointError(f"cannot copy {loc.url}: {type(exc).__name__}: {exc}") from exc
    finally:
        loc.close()
    result = CopyResult(
        src=str(loc.url),
        dst=str(dst_url.with_format(None)),
        step=loc.manifest.step if loc.manifest is not None else None,
        via_root=loc.via_root,
        seconds=round(time.perf_counter() - t0, 4),
        **info,
    )
    log.info(
        "%s %s: %.1f MB in %.2fs (%.2f GB/s) from %s",
        "saved" if result.mode == "convert" else "copied",
        result.dst,
        result.bytes / 1e6,
        result.seconds,
        result.gbps,
        result.src,
    )
    return result


def _split_options(
    src_scheme: str, dst_scheme: str, shared: dict[str, Any], dst_only: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(source options, destination options)`` (see :func:`copy`'s ``storage_options``)."""
    if src_scheme == dst_scheme:
        return dict(shared), {**shared, **dst_only}
    if src_scheme == "file":  # a local path takes no credentials: they are the destination's
        return {}, {**shared, **dst_only}
    return dict(shared), dict(dst_only)


# -- same format: the files as they are ------------------------------------------------------------
def stream_file(
    loc: Located, name: str, info: dict[str, Any], dst_backend: Any, data_dir: str, bar: Any
) -> tuple[int, str]:
    """Stream one file of the source to ``data_dir``; returns (bytes, xxh3-64 of what was written).

    The source's size is compared with the manifest *before* anything is read, and never more
    than that many bytes are copied, so a file that is something else than it claims (a device, a
    file that grows) costs nothing."""
    import xxhash

    src_path = loc.backend.join(loc.url.path, name)
    where = loc.backend.url(src_path)
    size = int(info["size"])
    actual = loc.backend.size(src_path)
    if actual != size:
        raise CorruptCheckpointError(f"{where} has {actual} bytes, its manifest says {size}", path=where)
    digest = xxhash.xxh3_64()
    n = 0
    with (
        loc.backend.open_read(src_path) as r,
        dst_backend.open_write(dst_backend.join(data_dir, name)) as w,
    ):
        while n < size:
            chunk = r.read(min(COPY_CHUNK, size - n))
            if not chunk:
                break
            w.write(chunk)
            digest.update(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    if n != size:
        raise CorruptCheckpointError(f"{where} has {n} bytes, its manifest says {size}", path=where)
    return n, digest.hexdigest()


def check_digest(loc: Located, name: str, info: dict[str, Any], digest: str) -> None:
    """Raise :class:`~ckptio.errors.CorruptCheckpointError` when ``digest`` (the xxh3-64 of file
    ``name`` as :func:`stream_file` copied it) is not the one the manifest's ``info`` records;
    a file with no recorded digest passes."""
    expected = info.get("xxh3")
    if expected is not None and digest != expected:
        where = loc.backend.url(loc.backend.join(loc.url.path, name))
        raise CorruptCheckpointError(f"checksum mismatch in {where}: the file is damaged", path=where)


def _copy_files(
    loc: Located, dst: Any, dst_backend: Any, overwrite: bool, verify: bool, progress: bool | None
) -> dict[str, Any]:
    """Copy a committed checkpoint file by file, manifest last.

    Nothing is decoded, so the layout (ranks, chunks, artifacts) and every checksum stay as they
    are; the copied manifest is byte-identical and still describes the copy. Before the commit the
    copy is verified against that manifest (as ``ckptio verify`` does, unless ``verify=False``),
    so a damaged or forged source is never published.
    """
    from .backend import read_limited
    from .commit import Target
    from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
    from .plugins import get_format
    from .progress import progress as progress_bar

    mpath = loc.backend.join(loc.url.path, MANIFEST_NAME)
    manifest_bytes = read_limited(loc.backend, mpath, MAX_MANIFEST_BYTES, "manifest")
    m = Manifest.from_bytes(manifest_bytes, loc.backend.url(mpath))  # what is copied is what is checked
    if MANIFEST_NAME in m.files:
        raise CorruptCheckpointError(
            f"{loc.url}: its manifest lists a data file named {MANIFEST_NAME}", path=str(loc.url)
        )
    fmt = get_format(m.format)
    target = Target.prepare(dst_backend, dst.path, overwrite=overwrite, what=str(dst), hint=_HINT)
    copied = 0
    try:
        with progress_bar(m.total_bytes, "cp", enable=False if progress is False else None) as bar:
            for name, info in sorted(m.files.items()):
                n, digest = stream_file(loc, name, info, dst_backend, target.data_dir, bar)
                if verify:
                    check_digest(loc, name, info, digest)
                copied += n
        target.check_files(m.files)
        if verify:
            fmt.verify(dst_backend, target.data_dir, m)  # every stored byte, against its checksums
    except BaseException:
        target.abort()
        raise
    target.commit(manifest_bytes)
    return {
        "mode": "files",
        "format": m.format,
        "bytes": copied,
        "bytes_read": copied,
        "files": len(m.files),
    }


# -- another format: saved anew, one tensor at a time ------------------------------------------------
class _TensorFeed:
    """Hands the destination's writer the source's tensors, read when asked (see the module's
    memory bound). Reads are serialised: the format's reader already reads each tensor on
    several threads, and one read at a time keeps the bound."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_bytes = 0
        sizes = {fqn: _nbytes(meta) for fqn, meta in source.tensors.items()}
        self._unread = set(sizes)
        self._sizes = sizes
        # small tensors, largest first (the order writers take them in), for batched reads
        small = sorted((f for f, n in sizes.items() if n <= SMALL_TENSOR_BYTES), key=lambda f: -sizes[f])
        self._small = collections.deque(small)
        self.bytes_read = 0

    def get(self, fqn: str) -> torch.Tensor:
        with self._lock:
            cached = self._cache.pop(fqn, None)
            if cached is not None:
                self._cache_bytes -= self._sizes[fqn]
                return cached
            batch = [fqn]
            if self._sizes.get(fqn, SMALL_TENSOR_BYTES + 1) <= SMALL_TENSOR_BYTES:
                room = PREFETCH_BYTES - self._cache_bytes
                while self._small and room > 0:
                    other = self._small.popleft()
                    if other == fqn or other not in self._unread:
                        continue
                    if self._sizes[other] > room:
                        self._small.appendleft(other)
                        break
                    batch.append(other)
                    room -= self._sizes[other]
            tensors = self.source.read_tensors(batch, alloc=_returned_on_free)
            for name in batch:
                self._unread.discard(name)
                self.bytes_read += self._sizes[name]
            for name in batch[1:]:
                self._cache[name] = tensors[name]
                self._cache_bytes += self._sizes[name]
            return tensors[fqn]


def _returned_on_free(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose memory goes back to the system as soon as the writer drops it.

    A large tensor gets its own anonymous ``mmap``, unmapped when the last reference goes.
    ``torch.empty`` would take it from the C allocator, which keeps freed blocks of a size it
    has seen before for reuse (glibc raises its mmap threshold after the first free) and can
    hold several tensors' worth of freed memory per writer thread: a conversion's peak memory
    would then depend on the allocator, not on the bound documented above.
    """
    import math
    import mmap

    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < SMALL_TENSOR_BYTES:
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).reshape(shape)


class _FeedPlanner(SafeSavePlanner):
    """The save planner of a conversion: the state holds ``meta`` placeholders (no memory), and
    each tensor's data comes from the :class:`_TensorFeed` when the writer resolves it."""

    def __init__(self, feed: _TensorFeed) -> None:
        super().__init__(check_replicas=False)  # one process writes the copy
        self._feed = feed

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type != WriteItemType.BYTE_IO:
            obj = self.state_dict.get(write_item.index.fqn)
            if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
                return self._feed.get(write_item.index.fqn)
        return super().resolve_data(write_item)


def _nbytes(meta: Any) -> int:
    import math

    return math.prod(tuple(meta.size)) * meta.properties.dtype.itemsize


def _artifacts(loc: Located) -> dict[str, dict[str, Any]]:
    """The source's files that hold no tensor or value: written by addons (``adapter_config.json``),
    carried over as they are. Indexes of the old layout (``*.index.json``) are not: the new
    format writes its own."""
    m = loc.manifest
    if m is None:
        return {}
    data_files = {e.file for e in loc.fmt.tensors(loc.backend, loc.url.path, m)}
    if not data_files:  # a format that does not list its files: nothing can be told apart
        return {}
    return {
        name: m.files[name] for name in sorted(set(m.files) - data_files) if not name.endswith(".index.json")
    }


def _convert(
    loc: Located,
    dst: Any,
    dst_backend: Any,
    fmt: Any,
    fopts: Any,
    overwrite: bool,
    verify: bool,
    progress: bool | None,
) -> dict[str, Any]:
    """Save the source anew in ``fmt`` with one rank, streaming its tensors (module docstring)."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import check_metadata, check_metrics, decode_metrics
    from .commit import Target
    from .manifest import Manifest
    from .progress import progress as progress_bar

    source = Source(loc, verify=verify)
    artifacts = _artifacts(loc)
    state = source.nested(source.values, lambda fqn, meta: None)
    if source.values:
        source.read_into(state)  # the non-tensor values: JSON, small
    state = source.nested(
        source.tensors,
        lambda fqn, meta: torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta"),
        into=state,
    )
    m = loc.manifest
    metrics = check_metrics(decode_metrics(m.metrics)) if m is not None else {}
    metadata = check_metadata(dict(m.metadata)) if m is not None else {}
    feed = _TensorFeed(source)
    target = Target.prepare(dst_backend, dst.path, overwrite=overwrite, what=str(dst), hint=_HINT)
    try:
        writer = fmt.storage_writer(dst_backend, target.data_dir, fopts, progress=progress)
        if dst_backend.commit_mode != "rename" and hasattr(writer, "save_token"):
            writer.save_token = target.token  # saves on object stores name their files with it
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, storage_writer=writer, planner=_FeedPlanner(feed), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if source.changed():
                raise source.replaced_error() from exc
            raise translate(exc, f"copy to {dst}") from exc
        files = dict(writer.files)
        carried = 0
        with progress_bar(
            sum(int(i["size"]) for i in artifacts.values()),
            "cp (artifacts)",
            enable=False if progress is False else None,
        ) as bar:
            for name, info in artifacts.items():
                if name in files:
                    raise CheckpointError(
                        f"{loc.url}: its file {name!r} (written by an addon) has the name of a file the "
                        f"{fmt.name} format writes; it cannot be carried over"
                    )
                n, digest = stream_file(loc, name, info, dst_backend, target.data_dir, bar)
                if verify:
                    check_digest(loc, name, info, digest)
                files[name] = dict(info)
                carried += n
        manifest = Manifest(
            format=fmt.name,
            files=files,
            format_metadata=writer.format_metadata,
            world_size=1,
            step=m.step if m is not None else None,
            metrics=metrics,  # type: ignore[arg-type]
            addons=list(m.addons) if m is not None else [],  # their artifacts and names come along
            metadata=metadata,
        )
        data = manifest.to_bytes()
        target.check_files(manifest.files)
        source.check_unchanged()  # the source was not replaced while it was read
    except BaseException:
        target.abort()
        raise
    target.commit(data)
    return {
        "mode": "convert",
        "format": fmt.name,
        "bytes": manifest.total_bytes,
        "bytes_read": feed.bytes_read + carried,
        "files": len(files),
        "artifacts": sorted(artifacts),
    }
