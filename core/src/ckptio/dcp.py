"""ckptio as a drop-in for ``torch.distributed.checkpoint`` users: a DCP ``StorageWriter`` and
``StorageReader`` for every URL ckptio serves.

::

    import torch.distributed.checkpoint as dcp
    dcp.save(state, storage_writer=ckptio.storage_writer("s3://bucket/run/step_5"))
    dcp.load(state, storage_reader=ckptio.storage_reader("s3://bucket/run/step_5"))

A plain ``dcp.save``/``dcp.async_save`` through :func:`storage_writer` follows ckptio's whole
commit protocol (docs/commit-protocol.md), without a collective of its own, so any process group
DCP is given works:

1. **Prepare** (coordinator, in ``prepare_global_plan``, once every rank has planned): a
   :class:`~ckptio.commit.Target`: roll back or forward an interrupted replacement of the URL,
   refuse what must not be replaced, take a lease, create the unique staging directory
   (``rename`` stores) or choose the save token that names every data file (``marker`` stores).
   The staging directory and the token reach every rank in their plan's ``storage_data``.
2. **Write** (every rank): the format's :class:`~ckptio.FormatWriter` writes the rank's files
   durably into the staging location. Non-tensor values are stored as ckptio's JSON, never as
   the pickles DCP's default planner makes, so the checkpoint loads without unpickling anything.
3. **Commit** (coordinator, in ``finish``, after DCP gathered every rank's results): check the
   files, write ``manifest.json`` last, publish (:func:`~ckptio.checkpoint.commit_manifest`).

Any failure the coordinator sees aborts the save (its staging location is removed). A failure on
another rank makes DCP skip ``finish``; the coordinator's staging location is then removed by the
writer's next save, :meth:`CkptioStorageWriter.close`, garbage collection or the exit of the
process, and after a crash by the next save or load of that URL (its lease is dead). Nothing is
visible before the commit in any case.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import weakref
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from .backend import Backend
from .checkpoint import (
    build_format_options,
    check_call_options,
    check_metadata,
    commit_manifest,
    find_format,
    manifest_changed,
    open_backend,
    read_manifest,
    replaced_error,
)
from .commit import Target, recover
from .errors import CheckpointError, StateMismatchError
from .formats.base import FormatWriter
from .manifest import Manifest
from .planner import SafeLoadPlanner, SafeSavePlanner
from .plugins import get_format
from .serialization import QUANTIZED_DTYPES, decode_value, encode_value, quantized_message
from .url import URL, parse_url

log = logging.getLogger("ckptio")

_WRITER_OPTIONS = ("storage_options", "overwrite", "metadata", "progress")
_READER_OPTIONS = ("storage_options", "verify", "progress")


def storage_writer(
    url: str | URL,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = True,
    metadata: dict[str, Any] | None = None,
    progress: bool | None = None,
    **format_options: Any,
) -> CkptioStorageWriter:
    """A DCP ``StorageWriter`` that saves a committed ckptio checkpoint at ``url``.

    Use it in ``dcp.save(state, storage_writer=...)`` or ``dcp.async_save(...)`` on every rank.
    The result is what ``ckptio.save`` writes: ``ckptio.load``, ``ckptio verify`` and the CLI read
    it, and a save interrupted at any point leaves nothing visible.

    :param url: a path, ``file://``, ``s3://``, ``gs://``, ``az://``, ``msc://``..., optionally
        with a format prefix (``safetensors+s3://bucket/run/step_5``). A ``checkpoint_id=`` given
        to ``dcp.save`` replaces it for that save (and later ones), with the same options.
    :param storage_options: passed to the backend (endpoint, credentials...).
    :param overwrite: replace a committed checkpoint at the URL (as DCP's own writers do).
    :param metadata: JSON values stored in the manifest, as ``ckptio.save(metadata=...)``.
    :param progress: ``False`` hides progress bars; ``None`` lets the terminal decide.
    :param format_options: the format's save options (``thread_count``...). A name that neither
        this function nor the format declares raises :class:`~ckptio.OptionError` (a
        ``TypeError``) naming the closest one.
    """
    return CkptioStorageWriter(
        url,
        storage_options=storage_options,
        overwrite=overwrite,
        metadata=metadata,
        progress=progress,
        format_options=format_options,
    )


def storage_reader(
    url: str | URL,
    *,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
    progress: bool | None = None,
    **format_options: Any,
) -> CkptioStorageReader:
    """A DCP ``StorageReader`` for the ckptio checkpoint at ``url`` (any format, any backend).

    Use it in ``dcp.load(state, storage_reader=...)`` on every rank. Each rank reads the manifest
    when the reader is created (errors such as :class:`~ckptio.CheckpointNotFoundError` are
    raised here, not wrapped by DCP); the load checks that every rank saw the same manifest and
    that no other save replaced the checkpoint while it was read
    (:class:`~ckptio.ConcurrentWriteError` otherwise).

    :param verify: check each chunk's checksum as it is read (on by default).
    :param format_options: the format's load options (``thread_count``, safetensors' ``prefix``...),
        checked like :func:`storage_writer`'s.
    """
    return CkptioStorageReader(
        url,
        storage_options=storage_options,
        verify=verify,
        progress=progress,
        format_options=format_options,
    )


# -- planners as ckptio's formats see them -----------------------------------------------------
class _JSONValuesSave:
    """The planner DCP passes to ``write_data``, with non-tensor values resolved to ckptio's JSON
    (DCP's default planner pickles them with ``torch.save``)."""

    def __init__(self, planner: SavePlanner) -> None:
        self._planner = planner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def resolve_data(self, item: Any) -> Any:
        if item.type != WriteItemType.BYTE_IO or isinstance(self._planner, SafeSavePlanner):
            return self._planner.resolve_data(item)
        lookup = getattr(self._planner, "lookup_object", None)
        if callable(lookup):  # DefaultSavePlanner and its subclasses: the value itself
            value = lookup(item.index)
        else:  # another planner's bytes: only plain values are accepted back (no code runs)
            data = cast(io.BytesIO, self._planner.resolve_data(item))
            data.seek(0)
            value = torch.load(data, weights_only=True)
        return io.BytesIO(encode_value(value, item.index.fqn))


class _JSONValuesLoad:
    """The planner DCP passes to ``read_data``, fed ckptio's JSON values: decoded here, then
    handed over the way the planner expects them (``torch.load`` of a stream)."""

    def __init__(self, planner: LoadPlanner) -> None:
        self._planner = planner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        if isinstance(self._planner, SafeLoadPlanner):
            self._planner.load_bytes(read_item, value)
            return
        obj = decode_value(value.getvalue(), read_item.dest_index.fqn)
        buf = io.BytesIO()
        torch.save(obj, buf)  # plain values decoded from JSON: re-serialised for the planner
        buf.seek(0)
        self._planner.load_bytes(read_item, buf)


@dataclasses.dataclass(frozen=True)
class _RankData:
    """What the coordinator sends each rank in its plan's ``storage_data``."""

    data_dir: str  # the staging directory (rename stores) or the target (marker stores)
    inner: Any  # the format writer's own storage_data (file prefix and save token)


def _bind(
    url: str | URL, storage_options: dict[str, Any] | None, fmt_name: str | None
) -> tuple[URL, Backend]:
    u = parse_url(url)
    if fmt_name is not None and u.format and u.format != fmt_name:
        raise CheckpointError(
            f"{u} names the {u.format!r} format, but this writer was created for {fmt_name!r}; "
            "create another ckptio.storage_writer for it"
        )
    return open_backend(u, storage_options)


# -- writer ----------------------------------------------------------------------------------
class CkptioStorageWriter(StorageWriter):
    """DCP ``StorageWriter`` over a ckptio format and backend, with ckptio's commit protocol.

    Created by :func:`ckptio.storage_writer`. After a save, :attr:`manifest` holds the committed
    manifest on the coordinator (``None`` on other ranks). One writer serves one save at a time;
    it can be reused for the next one (with ``checkpoint_id=`` for another URL).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = True,
        metadata: dict[str, Any] | None = None,
        progress: bool | None = None,
        format_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        u = parse_url(url)
        self._fmt = get_format(u.format or "native")
        given = dict(format_options or {})
        check_call_options(given, _WRITER_OPTIONS, "save", self._fmt.name, "ckptio.storage_writer")
        self._fopts = build_format_options(self._fmt, "save", given)
        self._metadata = check_metadata(metadata)
        self._storage_options = storage_options
        self._overwrite = bool(overwrite)
        self._progress = progress
        self._url, self._backend = _bind(u, storage_options, self._fmt.name)
        self._inner: FormatWriter | None = None
        self._target: Target | None = None
        self._finalizer: weakref.finalize | None = None
        #: The manifest of the last save this writer committed (on the coordinator).
        self.manifest: Manifest | None = None

    @property
    def url(self) -> str:
        """Where the next save goes."""
        return str(self._url.with_format(self._fmt.name if self._fmt.name != "native" else None))

    # DCP's StorageWriter API, in the order DCP calls it -------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        """A new save; ``checkpoint_id`` (a URL or path), when given, is where it goes."""
        self._abort_pending()
        if checkpoint_id is None:
            return
        u = parse_url(checkpoint_id)
        if u.with_format(None) == self._url.with_format(None):
            return
        new_url, new_backend = _bind(u, self._storage_options, self._fmt.name)
        old, self._url, self._backend = self._backend, new_url, new_backend
        old.close()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise CheckpointError(
                "ckptio.storage_writer needs DCP's collectives (use_collectives=True): the "
                "coordinator commits what every rank wrote"
            )
        self._abort_pending()  # a previous save through this writer that failed on another rank
        self.manifest = None
        self._inner = self._fmt.storage_writer(
            self._backend, self._url.path, self._fopts, progress=self._progress
        )
        self._inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self._url))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        quantized = sorted(
            item.index.fqn
            for item in plan.items
            if item.tensor_data is not None and item.tensor_data.properties.dtype in QUANTIZED_DTYPES
        )
        if quantized:
            raise StateMismatchError(quantized_message(quantized), mismatched=quantized)
        return self._writer().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator only, once every rank planned: prepare the commit target."""
        inner = self._writer()
        target = Target.prepare(self._backend, self._url.path, overwrite=self._overwrite, what=str(self._url))
        self._target = target
        self._finalizer = weakref.finalize(self, target.abort)  # a save nobody finishes
        try:
            if self._backend.commit_mode != "rename":
                inner.save_token = target.token  # marker stores: data files are named with it
            plans = inner.prepare_global_plan(plans)
            return [
                dataclasses.replace(p, storage_data=_RankData(target.data_dir, p.storage_data)) for p in plans
            ]
        except BaseException:
            self._abort_pending(quiet=True)
            raise

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        inner = self._writer()
        data = plan.storage_data
        if not isinstance(data, _RankData):
            raise CheckpointError(
                "this plan was not prepared by ckptio.storage_writer's coordinator: every rank of "
                "the save must use a ckptio.storage_writer"
            )
        inner.path = data.data_dir
        try:
            return inner.write_data(
                dataclasses.replace(plan, storage_data=data.inner),
                cast(SavePlanner, _JSONValuesSave(planner)),
            )
        except BaseException:
            self._abort_pending(quiet=True)  # the coordinator's own failure: DCP skips finish
            raise

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator only, after every rank wrote: the manifest last, then publish."""
        inner = self._writer()
        target = self._target
        if target is None:
            raise CheckpointError("ckptio.storage_writer: finish() without a prepared save")
        self._target = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        try:
            inner.finish(metadata, results)  # the format's metadata (and its index files)
            manifest = Manifest(
                format=self._fmt.name,
                files=dict(inner.files),
                format_metadata=inner.format_metadata,
                world_size=len(results),
                metadata=self._metadata,
            )
        except BaseException:
            target.abort()
            raise
        commit_manifest(target, manifest)  # aborts the target itself on failure
        self.manifest = manifest
        log.info("saved %s through dcp: %.1f MB", self._url, manifest.total_bytes / 1e6)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never chosen by DCP on its own: pass storage_writer=ckptio.storage_writer(...)

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Abort a save that did not finish and close the backend."""
        self._abort_pending()
        self._backend.close()

    def __enter__(self) -> CkptioStorageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writer(self) -> FormatWriter:
        if self._inner is None:
            raise CheckpointError("ckptio.storage_writer: use it through dcp.save or dcp.async_save")
        return self._inner

    def _abort_pending(self, quiet: bool = False) -> None:
        target, self._target = self._target, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if target is not None and not target.committed:
            if not quiet:  # a save that failed on another rank, found later
                log.warning("removing the staging location of an unfinished save of %s", target.what)
            target.abort()


# -- reader ----------------------------------------------------------------------------------
class CkptioStorageReader(StorageReader):
    """DCP ``StorageReader`` for a ckptio checkpoint, created by :func:`ckptio.storage_reader`."""

    def __init__(
        self,
        url: str | URL,
        *,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        progress: bool | None = None,
        format_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        u = parse_url(url)
        self._given = dict(format_options or {})
        check_call_options(self._given, _READER_OPTIONS, "load", u.format, "ckptio.storage_reader")
        self._storage_options = storage_options
        self._verify = bool(verify)
        self._progress = progress
        self._is_coordinator = True
        self._open(u)

    def _open(self, url: URL) -> None:
        u, backend = open_backend(url, self._storage_options)
        try:
            try:  # an interrupted replacement of this URL is finished before reading it
                recover(backend, u.path)
            except CheckpointError as exc:  # read-only storage: load what is there
                log.warning("could not check %s for an interrupted save: %s", u, exc)
            manifest = read_manifest(backend, u.path)
            fmt = find_format(backend, u, manifest, u.path)
            fopts = build_format_options(fmt, "load", self._given)
            inner = fmt.storage_reader(
                backend, u.path, manifest, fopts, verify=self._verify, progress=self._progress
            )
        except BaseException:
            backend.close()
            raise
        old = getattr(self, "_backend", None)
        self._url, self._backend, self._manifest, self._inner = u, backend, manifest, inner
        self._digest = getattr(manifest, "source_digest", None)
        if old is not None:
            old.close()

    @property
    def url(self) -> str:
        return str(self._url)

    @property
    def manifest(self) -> Manifest | None:
        """The manifest being loaded (``None`` for a foreign checkpoint a format recognised)."""
        return self._manifest

    @property
    def bytes_read(self) -> int:
        return int(getattr(self._inner, "bytes_read", 0))

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None and parse_url(checkpoint_id) != self._url:
            self._open(parse_url(checkpoint_id))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._inner.read_metadata()

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._is_coordinator = is_coordinator
        self._inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        plan = self._inner.prepare_local_plan(plan)
        return dataclasses.replace(plan, storage_data=(self._digest, plan.storage_data))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Coordinator: every rank must have read the same manifest (no save in between)."""
        digests = {p.storage_data[0] if isinstance(p.storage_data, tuple) else None for p in plans}
        if len(digests) > 1:
            raise replaced_error(self._url)
        plans = [
            dataclasses.replace(
                p, storage_data=p.storage_data[1] if isinstance(p.storage_data, tuple) else None
            )
            for p in plans
        ]
        return self._inner.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        try:
            fut = self._inner.read_data(plan, cast(LoadPlanner, _JSONValuesLoad(planner)))
            fut.wait()
        except CheckpointError as exc:
            if self._replaced():
                raise replaced_error(self._url) from exc
            raise
        if self._is_coordinator and self._replaced():
            # with verify=False a mix of two saves would otherwise go unnoticed
            raise replaced_error(self._url)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> CkptioStorageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replaced(self) -> bool:
        return self._manifest is not None and manifest_changed(self._backend, self._url.path, self._manifest)
