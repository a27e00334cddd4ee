"""The fsspec backend: object stores (and every other fsspec protocol) for ckptio checkpoints.

An adapter over :mod:`ckptio.objectstore`, which does the transfers: object stores have no atomic
directory rename, so the commit mode is ``marker`` (data objects go to their final keys and the
manifest, written last by the core, is the commit), and nothing is spooled to local disk.

* **writes** (``open_write``) on ``s3://`` are a :class:`~ckptio.objectstore.MultipartWriter` over
  s3fs's aiobotocore client (:meth:`FsspecBackend.s3_object`): one PUT up to
  ``multipart_threshold``, parallel parts above it, within the memory bound. Other protocols stream
  through the driver's own buffered writer with ``block_size=part_size`` (gcsfs resumable upload,
  adlfs block upload), sequential but bounded.
* **reads** are parallel ranged GETs (``cat_file(start, end)``) copied into the destination buffer.

**Create-if-absent** (``create_bytes``, the commit of a manifest and the run lock): on ``s3://``
(:class:`S3Backend`) one ``PutObject`` with ``If-None-Match: *``, so of two writers exactly one
wins (see :meth:`ckptio.objectstore.Transfers.create_if_absent`). AWS S3, MinIO and recent Ceph RGW
honour the header; an S3-compatible store that ignores it makes the create non-atomic.
``memory://`` (one process) is atomic under a lock (:class:`MemoryBackend`); other protocols check
then write.

Options: ckptio's own (:class:`ckptio.objectstore.TransferOptions`: ``part_size``,
``multipart_threshold``, ``concurrency``, ``read_chunk_size``, ``max_buffered``, ``attempts``,
``backoff``, ``max_backoff``); everything else goes to the fsspec driver, which also reads its own
config files and environment variables.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from ckptio.errors import BackendNotFoundError, CheckpointNotFoundError
from ckptio.ext import URL, ErrorMapper
from ckptio.objectstore import (
    MultipartWriter,
    ObjectStoreBackend,
    S3Object,
    TransferOptions,
    Transfers,
    Upload,
    accepted_keywords,
    secrets_in,
)

S3_SCHEMES = ("s3", "s3a")
#: protocol -> (extra of ckptio-fsspec, driver distribution) for "pip install" hints.
DRIVERS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
}

#: ``memory://`` lives in one process: a lock there makes check-then-write atomic
_MEMORY_CREATE_LOCK = threading.Lock()


def _driver_keywords(scheme: str) -> set[str]:
    with contextlib.suppress(ImportError, ValueError):
        return accepted_keywords(fsspec.get_filesystem_class(scheme))
    return set()


class FsspecBackend(ObjectStoreBackend):
    """A ckptio backend over any fsspec file system (see the module docstring for the options)."""

    def __init__(self, url: URL, **storage_options: Any) -> None:
        opts = dict(storage_options)
        transfer = TransferOptions.pop_from(
            opts,
            driver=lambda: _driver_keywords(url.scheme),
            where=f"the {url.scheme}:// backend (storage_options)",
        )
        if url.scheme in S3_SCHEMES:
            transfer.check_s3_limits()
        super().__init__(
            url.scheme, Transfers(transfer, ErrorMapper(secrets_in(opts)), "ckptio-fsspec"), **opts
        )
        # Several processes write the same prefix: a cached listing in this one would go stale.
        opts.setdefault("use_listings_cache", False)
        if url.scheme in S3_SCHEMES:
            # ckptio retries itself (with jitter, per part); botocore's own retries would multiply
            # the wait on a dead endpoint. A user's explicit config wins.
            cfg = dict(opts.get("config_kwargs") or {})
            cfg.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
            opts["config_kwargs"] = cfg
        try:
            self.fs, _ = fsspec.core.url_to_fs(f"{url.scheme}://{url.path}", **opts)
        except ImportError as exc:
            extra, dist = DRIVERS.get(url.scheme, ("", ""))
            hint = f"pip install 'ckptio-fsspec[{extra}]' (or pip install {dist})" if dist else f"({exc})"
            raise BackendNotFoundError(
                f"{url.scheme}:// needs an fsspec driver that is not installed: {hint}"
            ) from exc
        except ValueError as exc:
            if "Protocol not known" in str(exc):
                raise BackendNotFoundError(f"fsspec knows no protocol {url.scheme!r}") from exc
            raise

    def fspath(self, path: str) -> str:
        """The driver's spelling of a backend path (``/bucket/key`` for ``memory``)."""
        return str(self.fs._strip_protocol(f"{self.scheme}://{path}"))

    def _sync(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, coro_fn, *args)

    def s3_object(self, path: str) -> S3Object:
        """``path`` as an :class:`~ckptio.objectstore.S3Object` on s3fs's aiobotocore client."""
        bucket, _, key = self.fspath(path).partition("/")

        async def invoke(operation: str, params: dict[str, Any]) -> Any:
            await self.fs.set_session()  # a no-op once connected; other ranks may not be yet
            s3 = await self.fs.get_s3(bucket)
            return await getattr(s3, operation)(**params)

        return S3Object(
            lambda operation, **params: self._sync(invoke, operation, params),
            bucket,
            key,
            read_body=lambda body: bytes(self._sync(body.read)),
        )

    # -- transfers ------------------------------------------------------------------------------
    def fetch_range(self, path: str, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.fspath(path), start=start, end=end))

    def writer(self, path: str) -> Upload:
        if self.scheme in S3_SCHEMES and getattr(self.fs, "async_impl", False):
            return MultipartWriter(self.s3_object(path), self.transfers, self.url(path))
        return _DriverUpload(self, path)

    def changed(self, path: str) -> None:
        self.fs.invalidate_cache(self.fspath(path))

    # -- metadata -----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        fpath = self.fspath(path)
        return bool(self.call("check", path, lambda: self.fs.exists(fpath)))

    def size(self, path: str) -> int:
        fpath = self.fspath(path)
        info = self.call("stat", path, lambda: self.fs.info(fpath))
        if info.get("type") == "directory":
            raise CheckpointNotFoundError(f"{self.url(path)} is a directory, not a file")
        return int(info["size"])

    def listdir(self, path: str) -> list[str]:
        fpath = self.fspath(path)

        def ls() -> list[str]:
            try:
                entries = self.fs.ls(fpath, detail=False)
            except FileNotFoundError:
                return []
            names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
            names.discard("")
            # some drivers list the prefix itself as an empty "directory" object
            own = fpath.rstrip("/").rsplit("/", 1)[-1]
            if len(entries) == 1 and str(entries[0]).rstrip("/") == fpath.rstrip("/"):
                names.discard(own)
            return sorted(names)

        return self.call("list", path, ls)

    def is_dir(self, path: str) -> bool:
        fpath = self.fspath(path)
        return bool(self.call("check", path, lambda: self.fs.isdir(fpath)))

    def walk_files(self, path: str) -> Iterator[str]:
        fpath = self.fspath(path).rstrip("/")
        found = self.call("list", path, lambda: self.fs.find(fpath))
        for p in sorted(found):
            rel = str(p)[len(fpath) :].lstrip("/")
            if rel:
                yield rel

    def remove(self, path: str, recursive: bool = False) -> None:
        fpath = self.fspath(path)

        def rm() -> None:
            try:
                if recursive:
                    if self.fs.exists(fpath):
                        self.fs.rm(fpath, recursive=True)
                else:
                    self.fs.rm_file(fpath)
            except FileNotFoundError:
                pass

        self.call("delete", path, rm)


class _DriverUpload:
    """Protocols other than S3: the driver's buffered writer, committed by ``close()``."""

    def __init__(self, backend: FsspecBackend, path: str) -> None:
        self.backend, self.path = backend, path
        fpath, block = backend.fspath(path), backend.transfer.part_size
        self.f = backend.call(
            "open for writing", path, lambda: backend.fs.open(fpath, "wb", block_size=block)
        )

    def write(self, b: Any) -> int:
        return int(self.f.write(b))

    def commit(self) -> None:
        try:
            self.backend.call("upload", self.path, self.f.close)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the half-written stream so that nothing appears at the path."""
        with contextlib.suppress(Exception):
            if hasattr(self.f, "discard"):
                self.f.discard()  # aborts the multipart/resumable upload where the driver supports it
        with contextlib.suppress(Exception):
            self.f.closed = True  # so that no later close()/__del__ commits the partial data
        with contextlib.suppress(Exception):
            self.backend.fs.rm_file(self.backend.fspath(self.path))


class S3Backend(FsspecBackend):
    """``s3://`` and ``s3a://``: ``create_bytes`` is a conditional ``PutObject`` (atomic)."""

    atomic_create = True

    def conditional_client(self, path: str) -> S3Object:
        return self.s3_object(path)


class MemoryBackend(FsspecBackend):
    """``memory://`` (one process): ``create_bytes`` is atomic under a process-wide lock, and a
    write is stored whole when it ends (fsspec's memory files are visible from ``open``)."""

    atomic_create = True

    def create_bytes(self, path: str, data: bytes) -> bool:
        with _MEMORY_CREATE_LOCK:
            return super().create_bytes(path, data)

    def writer(self, path: str) -> Upload:
        return _MemoryUpload(self, path)


class _MemoryUpload(io.BytesIO):
    """Held in this process's memory (where the object goes anyway), stored by :meth:`commit`."""

    def __init__(self, backend: MemoryBackend, path: str) -> None:
        super().__init__()
        self.backend, self.path = backend, path

    def commit(self) -> None:
        data, fpath = self.getvalue(), self.backend.fspath(self.path)
        self.close()
        self.backend.call("write", self.path, lambda: self.backend.fs.pipe_file(fpath, data))

    def abort(self) -> None:
        self.close()
