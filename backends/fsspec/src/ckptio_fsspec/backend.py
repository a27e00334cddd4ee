"""The fsspec backend: object stores (and every other fsspec protocol) for ckptio checkpoints.

Object stores have no atomic directory rename, so the commit mode is ``marker``: data objects go to
their final keys and the manifest, written last by the core, is the commit. Everything, tensors and
small files alike, goes through the store; nothing is spooled to local disk.

Data paths are where the time goes, so they bypass fsspec's buffered file objects:

* **writes** (:meth:`FsspecBackend.open_write`) on ``s3://`` cut the stream into ``part_size``
  parts uploaded in parallel as an S3 multipart upload (:mod:`ckptio_fsspec.s3`); at most
  ``concurrency`` parts are in flight per backend, so memory stays near
  ``part_size x (2 x concurrency + open writers)`` whatever the size written (see ``s3.py``). Other protocols stream
  through the driver's own buffered writer with ``block_size=part_size`` (gcsfs resumable upload,
  adlfs block upload), which is sequential but bounded.
* **reads** (:meth:`FsspecBackend.read_into`) split a range into ``read_chunk_size`` pieces fetched
  by parallel ranged GETs and copied straight into the destination buffer.

Every call is retried on transient failures (see :mod:`ckptio_fsspec.retry`).

**Create-if-absent** (:meth:`FsspecBackend.create_bytes`, the commit of a manifest and the run
lock): on ``s3://`` it is one ``PutObject`` with ``If-None-Match: *``, so of two writers exactly
one wins (412 ``PreconditionFailed`` for the other; a 409 ``ConditionalRequestConflict`` is
retried, then counts as lost). On a 412 the object is read back: when it holds exactly the bytes
being created, the create counts as done (a put that succeeded before its answer was lost and was
retried, by ckptio or by botocore, finds its own object). Callers put a unique token in ``data``. AWS S3, MinIO and
recent Ceph RGW honour the header; an S3-compatible store that ignores it makes the create
non-atomic. ``s3://``/``s3a://`` are served by :class:`S3Backend` and ``memory://`` (one process)
by :class:`MemoryBackend`, both with ``atomic_create = True``; other protocols check then write.

Options (``storage_options`` of a manager or call; the rest go to the fsspec driver, which also
reads its own config files and environment variables):

``part_size`` (default 32 MiB), ``concurrency`` (8), ``read_chunk_size`` (= ``part_size``),
``multipart_threshold`` (S3: larger objects are multipart uploads, default ``2 x part_size``),
``attempts`` (5), ``backoff`` (0.2 s base), ``max_backoff`` (5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import fsspec
from ckptio.errors import BackendNotFoundError, CheckpointError, CorruptCheckpointError
from ckptio.ext import (
    URL,
    Backend,
    ErrorMapper,
    RetryPolicy,
    after_conditional_failure,
    aretry_call,
    classify,
    retry_call,
)

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_PART_SIZE = 32 * MiB
DEFAULT_CONCURRENCY = 8

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
SECRET_KEYS = (
    "key",
    "secret",
    "token",
    "session_token",
    "account_key",
    "connection_string",
    "sas_token",
    "password",
)


def _secrets(options: dict[str, Any]) -> list[str]:
    """Every secret-looking value in the storage options (to scrub from messages)."""
    out: list[str] = []
    for k, v in options.items():
        if isinstance(v, dict):
            out += _secrets(v)
        elif isinstance(v, str) and any(s in k.lower() for s in SECRET_KEYS):
            out.append(v)
            if "AccountKey=" in v:  # Azure connection strings
                out += [p.split("=", 1)[1] for p in v.split(";") if p.startswith("AccountKey=")]
    return out


#: ``memory://`` lives in one process: a lock there makes check-then-write atomic
_MEMORY_CREATE_LOCK = threading.Lock()


class FsspecBackend(Backend):
    """A ckptio backend over any fsspec file system (see the module docstring for the options)."""

    commit_mode = "marker"

    def __init__(
        self,
        url: URL,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        read_chunk_size: int | None = None,
        multipart_threshold: int | None = None,
        attempts: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        **storage_options: Any,
    ) -> None:
        super().__init__(url.scheme, **storage_options)
        if part_size < 5 * MiB and url.scheme in ("s3", "s3a"):
            raise ValueError(f"part_size must be at least 5 MiB for S3 multipart uploads (got {part_size})")
        self.part_size = int(part_size)
        self.concurrency = max(1, int(concurrency))
        self.read_chunk_size = int(read_chunk_size or part_size)
        self.multipart_threshold = int(
            multipart_threshold if multipart_threshold is not None else 2 * part_size
        )
        self.policy = RetryPolicy(attempts=max(1, int(attempts)), base_delay=backoff, max_delay=max_backoff)
        self.errors = ErrorMapper(_secrets(storage_options))
        opts = dict(storage_options)
        # Several processes write the same prefix: a cached listing in this one would go stale.
        opts.setdefault("use_listings_cache", False)
        if url.scheme in ("s3", "s3a"):
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
        self.is_async = bool(getattr(self.fs, "async_impl", False))
        self._slots = threading.BoundedSemaphore(self.concurrency)  # parts in flight (writes)
        self._buffers: list[bytearray] = []  # recycled part buffers
        self._buf_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._aslots: asyncio.Semaphore | None = None

    # -- helpers ------------------------------------------------------------------------------
    def fspath(self, path: str) -> str:
        """The driver's spelling of a backend path (``/bucket/key`` for ``memory``)."""
        return str(self.fs._strip_protocol(f"{self.scheme}://{path}"))

    def url(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    def call(self, action: str, path: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, self.policy, self.errors, action, self.url(path))

    def _sync(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, coro_fn, *args)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="ckptio-fsspec")
        return self._pool

    def take_buffer(self) -> bytearray:
        with self._buf_lock:
            return self._buffers.pop() if self._buffers else bytearray(self.part_size)

    def give_buffer(self, buf: bytearray) -> None:
        with self._buf_lock:
            if len(self._buffers) < self.concurrency:
                self._buffers.append(buf)

    # -- writes -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        if self.scheme in ("s3", "s3a") and self.is_async:
            from .s3 import S3MultipartWriter

            writer = S3MultipartWriter(self, path)
            try:
                yield writer  # type: ignore[misc]
            except BaseException:
                writer.abort()
                raise
            writer.commit()
            return
        fpath = self.fspath(path)
        f = self.call("open for writing", path, lambda: self.fs.open(fpath, "wb", block_size=self.part_size))
        try:
            yield f
        except BaseException:
            self._discard(f, path)
            raise
        try:
            self.call("upload", path, f.close)
        except BaseException:
            self._discard(f, path)
            raise

    def _discard(self, f: Any, path: str) -> None:
        """Drop a half-written stream so that nothing appears at ``path``."""
        with contextlib.suppress(Exception):
            if hasattr(f, "discard"):
                f.discard()  # aborts the multipart/resumable upload where the driver supports it
        with contextlib.suppress(Exception):
            f.closed = True  # so that no later close()/__del__ commits the partial data
        with contextlib.suppress(Exception):
            self.fs.rm_file(self.fspath(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """One PUT: object stores replace objects atomically, so readers see old or new."""
        fpath = self.fspath(path)
        self.call("write", path, lambda: self.fs.pipe_file(fpath, bytes(data)))

    # -- reads --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        fpath = self.fspath(path)
        f = self.call("open", path, lambda: self.fs.open(fpath, "rb", block_size=self.read_chunk_size))
        with f:
            yield f

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:  # an empty range (e.g. an empty FSDP shard); S3 would answer with the whole object
            return b""
        if length is not None and length > self.read_chunk_size:
            out = bytearray(length)
            self.read_into(path, offset, memoryview(out))
            return bytes(out)
        fpath = self.fspath(path)
        end = None if length is None else offset + length
        data = self.call("read", path, lambda: self.fs.cat_file(fpath, start=offset or None, end=end))
        return bytes(data)

    def _ranges(self, offset: int, n: int) -> list[tuple[int, int]]:
        step = self.read_chunk_size
        return [(pos, min(n, pos + step)) for pos in range(0, n, step)]

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Parallel ranged GETs of ``read_chunk_size`` bytes, each copied into its slice of ``out``."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        n = len(out)
        if n == 0:
            return
        fpath = self.fspath(path)
        url = self.url(path)
        ranges = self._ranges(offset, n)

        def place(lo: int, hi: int, data: bytes) -> None:
            if len(data) != hi - lo:
                raise CorruptCheckpointError(
                    f"{url} is truncated: wanted {n} bytes at offset {offset}, got {lo + len(data)}", path=url
                )
            out[lo:hi] = data

        if self.is_async:

            async def one(lo: int, hi: int) -> None:
                assert self._aslots is not None
                async with self._aslots:
                    data = await aretry_call(
                        lambda: self.fs._cat_file(fpath, start=offset + lo, end=offset + hi),
                        self.policy,
                        self.errors,
                        "read",
                        url,
                    )
                place(lo, hi, data)

            async def all_chunks() -> None:
                if self._aslots is None:
                    self._aslots = asyncio.Semaphore(self.concurrency)
                await asyncio.gather(*(one(lo, hi) for lo, hi in ranges))

            self._sync(all_chunks)
            return

        def fetch(lo: int, hi: int) -> None:
            data = self.call(
                "read", path, lambda: self.fs.cat_file(fpath, start=offset + lo, end=offset + hi)
            )
            place(lo, hi, data)

        if len(ranges) == 1:
            fetch(*ranges[0])
            return
        for fut in [self._threads().submit(fetch, lo, hi) for lo, hi in ranges]:
            fut.result()

    # -- metadata -----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        fpath = self.fspath(path)
        return bool(self.call("check", path, lambda: self.fs.exists(fpath)))

    def size(self, path: str) -> int:
        fpath = self.fspath(path)
        return int(self.call("stat", path, lambda: self.fs.size(fpath)))

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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def is_transient(self, exc: BaseException) -> bool:
        return classify(exc) == "transient"


class S3Backend(FsspecBackend):
    """``s3://`` and ``s3a://``: :meth:`create_bytes` is a conditional ``PutObject``."""

    atomic_create = True

    def create_bytes(self, path: str, data: bytes) -> bool:
        body = bytes(data)
        bucket, _, key = self.fspath(path).partition("/")
        url = self.url(path)

        async def client() -> Any:
            await self.fs.set_session()
            return await self.fs.get_s3(bucket)

        async def holds_ours() -> bool:
            """On 412: is the object there exactly our bytes (our own put, whose answer was lost)?"""
            s3 = await client()
            resp = await s3.get_object(Bucket=bucket, Key=key)
            async with resp["Body"] as stream:  # closed unread when the size differs
                return int(resp.get("ContentLength", -1)) == len(body) and bytes(await stream.read()) == body

        async def run() -> bool:
            for attempt in range(self.policy.attempts):
                try:
                    s3 = await client()
                    await s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
                    return True
                except CheckpointError:
                    raise
                except Exception as exc:
                    action = after_conditional_failure(exc, attempt, self.policy)
                    if action == "exists":
                        return await holds_ours()
                    if action == "lost":
                        return False
                    if action == "raise":
                        raise self.errors.to_ckptio(exc, "create", url, attempt + 1) from exc
                    await asyncio.sleep(self.policy.delay(attempt))
            return False  # pragma: no cover - the loop returns or raises

        try:
            return bool(self._sync(run))
        finally:
            self.fs.invalidate_cache(self.fspath(path))


class MemoryBackend(FsspecBackend):
    """``memory://`` (one process): :meth:`create_bytes` is atomic under a process-wide lock."""

    atomic_create = True

    def create_bytes(self, path: str, data: bytes) -> bool:
        with _MEMORY_CREATE_LOCK:
            return super().create_bytes(path, data)
