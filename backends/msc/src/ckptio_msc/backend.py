"""ckptio backends for NVIDIA multi-storage-client (MSC) profiles: ``msc://profile/path``.

MSC reads its config from ``$MSC_CONFIG`` or its standard locations (``~/.msc_config.yaml``,
``~/.config/msc/config.yaml``, ``/etc/msc_config.yaml``...), or from ``storage_options={"msc_config":
{...}}`` (the same dict as the YAML file) when a run carries its own. A backend path is
``profile/key``; the key is relative to the profile's ``base_path``.

The commit mode follows the profile's *declared provider type*, never the path:

* a POSIX ``file`` provider is a local or shared file system: :class:`MscPosixBackend` delegates to
  ckptio's local backend on the physical path (fsync, ``commit_mode = "rename"``).
* every other provider is an object store: :class:`MscBackend`, ``commit_mode = "marker"``.

Why not MSC's own ``open("wb")``: it keeps the whole object in a ``BytesIO`` until ``close()``,
i.e. a checkpoint file's full size in RAM. Instead, on ``s3`` providers (boto3 client) writes are a
parallel multipart upload of ``part_size`` parts through the provider's boto3 client, at most
``concurrency`` in flight per backend, so memory stays near ``part_size x (concurrency + writers)``
and nothing touches local disk; objects up to ``multipart_threshold`` (default two parts, the 64 MiB
MSC itself uses) are held and sent with one ``PutObject``. Other providers (gcs, azure, oci, ais...) have no multipart API
that MSC exposes per part, so their writes spool into a ``SpooledTemporaryFile`` (in memory up to
``part_size``, then a local temporary file) which MSC's ``upload_file`` sends with the provider's
own parallel transfer manager on close: bounded memory, at the price of a local temp copy.

**Create-if-absent** (:meth:`~ckptio.backend.Backend.create_bytes`, the commit of a manifest and
the run lock): on ``s3`` profiles (:class:`MscS3Backend`) it is one ``PutObject`` with
``If-None-Match: *`` through the provider's boto3 client, atomic: a 412 means another writer won, a
409 ``ConditionalRequestConflict`` is retried and then counts as lost, and on a 412 an object that
holds exactly the bytes being created counts as this writer's own (a retried put whose first answer
was lost). POSIX profiles use the local backend's ``link(2)``.
Other providers check then write (MSC 1.3 raises ``NotImplementedError`` for ``if_none_match="*"``
on gcs and azure), so their ``atomic_create`` is ``False``.

On POSIX profiles the profile's ``base_path`` may itself lie below a symlink (``/data`` linking to
another disk): it is resolved once, and below it the local backend follows no link (see
:mod:`ckptio_local.backend`).

Reads are parallel ranged reads (``StorageClient.read(key, byte_range=Range(...))``) copied into the
destination buffer. Every call is retried on transient failures (:mod:`ckptio.retry`), on top of
MSC's per-profile ``retry`` settings.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, TypeVar

from ckptio.errors import CheckpointError, CorruptCheckpointError, InvalidURLError, StorageError
from ckptio.ext import URL, Backend, ErrorMapper, RetryPolicy, after_conditional_failure, retry_call
from ckptio_local import LocalBackend

T = TypeVar("T")
MiB = 1 << 20
DEFAULT_PART_SIZE = 32 * MiB
DEFAULT_CONCURRENCY = 8


def _msc() -> Any:
    try:
        import multistorageclient
    except ImportError as exc:  # pragma: no cover - a declared dependency
        from ckptio.errors import BackendNotFoundError

        raise BackendNotFoundError("msc:// needs multi-storage-client: pip install ckptio-msc") from exc
    return multistorageclient


class _Profiles:
    """One MSC ``StorageClient`` per profile: from ``msc_config`` when given, else MSC's config file."""

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.config = config
        self.clients: dict[str, Any] = {}
        self.lock = threading.Lock()

    def client(self, profile: str) -> Any:
        with self.lock:
            if profile not in self.clients:
                msc = _msc()
                try:
                    if self.config is not None:
                        cfg = msc.StorageClientConfig.from_dict(self.config, profile=profile)
                        self.clients[profile] = msc.StorageClient(cfg)
                    else:
                        self.clients[profile], _ = msc.resolve_storage_client(f"msc://{profile}/")
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise StorageError(
                        f"msc://{profile}: cannot open this multi-storage-client profile ({type(exc).__name__}: "
                        f"{str(exc)[:300]}); define it in $MSC_CONFIG or ~/.msc_config.yaml, or pass "
                        "storage_options={'msc_config': {...}}"
                    ) from exc
            return self.clients[profile]

    def split(self, path: str) -> tuple[Any, str]:
        profile, _, key = path.partition("/")
        if not profile:
            raise InvalidURLError(f"msc://{path}: no profile name")
        return self.client(profile), key


def _is_s3(client: Any) -> bool:
    return type(client._storage_provider).__name__ == "S3StorageProvider"


def _pop_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "part_size",
        "concurrency",
        "multipart_threshold",
        "read_chunk_size",
        "attempts",
        "backoff",
        "max_backoff",
        "msc_config",
    )
    return {k: options.pop(k) for k in keys if k in options}


def open_msc_backend(url: URL, **storage_options: Any) -> Backend:
    """The backend factory: the profile's provider type picks the commit mode."""
    opts = dict(storage_options)
    own = _pop_options(opts)
    profiles = _Profiles(own.get("msc_config"))
    client, _ = profiles.split(url.path)
    if client._is_posix_file_storage_provider():
        return MscPosixBackend(url, profiles=profiles, **own)
    if _is_s3(client):
        return MscS3Backend(url, profiles=profiles, **own)
    return MscBackend(url, profiles=profiles, **own)


class MscBackend(Backend):
    """An object-store MSC profile (see the module docstring)."""

    commit_mode = "marker"

    def __init__(
        self,
        url: URL,
        *,
        profiles: _Profiles | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        multipart_threshold: int | None = None,
        read_chunk_size: int | None = None,
        attempts: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        msc_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__("msc")
        if part_size < 5 * MiB:
            raise ValueError(f"part_size must be at least 5 MiB (S3 multipart minimum), got {part_size}")
        self.profiles = profiles or _Profiles(msc_config)
        self.part_size = int(part_size)
        self.concurrency = max(1, int(concurrency))
        # objects up to this size are one PutObject (as MSC's own 64 MiB multipart_threshold)
        self.multipart_threshold = max(
            self.part_size,
            int(multipart_threshold) if multipart_threshold is not None else 2 * self.part_size,
        )
        self.read_chunk_size = int(read_chunk_size or part_size)
        self.policy = RetryPolicy(attempts=max(1, int(attempts)), base_delay=backoff, max_delay=max_backoff)
        self.errors = ErrorMapper()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"msc://{path}"

    def call(self, action: str, path: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, self.policy, self.errors, action, self.url(path))

    def pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # parts/chunks in flight are bounded by the semaphore / chunking, not by this pool
                self._pool = ThreadPoolExecutor(self.concurrency * 2, thread_name_prefix="ckptio-msc")
            return self._pool

    # -- writes -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        client, key = self.profiles.split(path)
        provider = client._storage_provider
        if type(provider).__name__ == "S3StorageProvider" and not client._is_rust_client_enabled():
            writer: _S3Parts | _Spooled = _S3Parts(self, path, provider, key)
        else:
            writer = _Spooled(self, path, client, key)
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def write_bytes(self, path: str, data: bytes) -> None:
        client, key = self.profiles.split(path)
        self.call("write", path, lambda: client.write(key, bytes(data)))

    # -- reads --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        yield io.BytesIO(self.read_bytes(path))

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.size(path) - offset
        out = bytearray(max(0, length))
        self.read_into(path, offset, memoryview(out))
        return bytes(out)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        msc = _msc()
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        n = len(out)
        if n == 0:
            return
        client, key = self.profiles.split(path)
        url = self.url(path)

        def fetch(lo: int, hi: int) -> None:
            rng = msc.types.Range(offset=offset + lo, size=hi - lo)
            data = self.call("read", path, lambda: client.read(key, byte_range=rng))
            if len(data) != hi - lo:
                raise CorruptCheckpointError(
                    f"{url} is truncated: wanted {n} bytes at offset {offset}, got {lo + len(data)}", path=url
                )
            out[lo:hi] = data

        step = self.read_chunk_size
        ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        if len(ranges) == 1:
            fetch(*ranges[0])
            return
        # at most `concurrency` chunks of one read in flight: bounded memory per reader
        for start in range(0, len(ranges), self.concurrency):
            for fut in [
                self.pool().submit(fetch, lo, hi) for lo, hi in ranges[start : start + self.concurrency]
            ]:
                fut.result()

    # -- metadata -----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        client, key = self.profiles.split(path)
        if not key:
            return True
        return bool(self.call("check", path, lambda: client.is_file(key) or not client.is_empty(key)))

    def size(self, path: str) -> int:
        client, key = self.profiles.split(path)
        return int(self.call("stat", path, lambda: client.info(key).content_length))

    def listdir(self, path: str) -> list[str]:
        client, key = self.profiles.split(path)
        prefix = key.rstrip("/") + "/" if key else ""

        def ls() -> list[str]:
            names: set[str] = set()
            for meta in client.list(prefix, include_directories=True):
                rel = str(meta.key)[len(prefix) :] if str(meta.key).startswith(prefix) else str(meta.key)
                first = rel.strip("/").split("/", 1)[0]
                if first:
                    names.add(first)
            return sorted(names)

        try:
            return self.call("list", path, ls)
        except FileNotFoundError:
            return []

    def walk_files(self, path: str) -> Iterator[str]:
        client, key = self.profiles.split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        metas = self.call("list", path, lambda: list(client.list(prefix)))
        for meta in sorted(metas, key=lambda m: str(m.key)):
            rel = str(meta.key)[len(prefix) :]
            if rel and getattr(meta, "type", "file") == "file":
                yield rel

    def remove(self, path: str, recursive: bool = False) -> None:
        client, key = self.profiles.split(path)

        def rm() -> None:
            try:
                if recursive:
                    if not client.is_empty(key.rstrip("/") + "/"):
                        client.delete(key.rstrip("/") + "/", recursive=True)
                    if client.is_file(key):
                        client.delete(key)
                else:
                    client.delete(key)
            except FileNotFoundError:
                pass

        try:
            self.call("delete", path, rm)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class MscS3Backend(MscBackend):
    """An ``s3`` MSC profile: :meth:`create_bytes` is a conditional ``PutObject`` (atomic)."""

    atomic_create = True

    def create_bytes(self, path: str, data: bytes) -> bool:
        client, key = self.profiles.split(path)
        if not _is_s3(client):  # a path on another profile
            return super().create_bytes(path, data)
        from multistorageclient.utils import split_path

        provider = client._storage_provider
        s3 = provider._s3_client
        bucket, okey = split_path(provider._prepend_base_path(key))
        body, url = bytes(data), self.url(path)
        for attempt in range(self.policy.attempts):
            try:
                s3.put_object(Bucket=bucket, Key=okey, Body=body, IfNoneMatch="*")
                return True
            except Exception as exc:
                action = after_conditional_failure(exc, attempt, self.policy)
                if action == "exists":
                    return self._holds(s3, bucket, okey, body)
                if action == "lost":
                    return False
                if action == "raise":
                    raise self.errors.to_ckptio(exc, "create", url, attempt + 1) from exc
                time.sleep(self.policy.delay(attempt))
        return False  # pragma: no cover - the loop returns or raises

    @staticmethod
    def _holds(s3: Any, bucket: str, key: str, body: bytes) -> bool:
        """On 412: is the object there exactly our bytes (our own put, whose answer was lost)?"""
        resp = s3.get_object(Bucket=bucket, Key=key)
        with contextlib.closing(resp["Body"]) as stream:  # closed unread when the size differs
            return int(resp.get("ContentLength", -1)) == len(body) and bytes(stream.read()) == body


class _S3Parts(io.RawIOBase):
    """Parallel multipart upload through an MSC S3 provider's boto3 client (see the module doc)."""

    def __init__(self, backend: MscBackend, path: str, provider: Any, key: str) -> None:
        super().__init__()
        from multistorageclient.utils import split_path

        self.backend, self.path, self.url = backend, path, backend.url(path)
        self.s3 = provider._s3_client
        self.bucket, self.key = split_path(provider._prepend_base_path(key))
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.futures: list[Future[None]] = []
        self.next_part = 1
        self.failed: BaseException | None = None

    def writable(self) -> bool:
        return True

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, self.backend.policy, self.backend.errors, action, self.url)

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        size, threshold = self.backend.part_size, self.backend.multipart_threshold
        pos = 0
        while pos < len(mv):
            if self.failed is not None:
                raise self.failed
            if self.upload_id is None and len(self.buf) == threshold:
                # more data than one PutObject takes: cut what is held into parts (the first
                # _send starts the multipart upload)
                held, self.buf = self.buf, bytearray()
                for k in range(0, len(held), size):
                    self.buf = held[k : k + size]
                    if len(self.buf) == size:
                        self._send()
                del held
            limit = threshold if self.upload_id is None else size
            take = min(limit - len(self.buf), len(mv) - pos)
            self.buf += mv[pos : pos + take]
            pos += take
            if self.upload_id is not None and len(self.buf) == size:
                self._send()
        return len(mv)

    def _send(self) -> None:
        if self.upload_id is None:
            resp = self._call(
                "start upload of", lambda: self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key)
            )
            self.upload_id = str(resp["UploadId"])
        body, num = bytes(self.buf), self.next_part
        self.buf = bytearray()
        self.next_part += 1
        self.backend._slots.acquire()  # bounded memory: block while `concurrency` parts are in flight

        def upload() -> None:
            try:
                resp = self._call(
                    f"upload part {num} of",
                    lambda: self.s3.upload_part(
                        Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=num, Body=body
                    ),
                )
                self.etags[num] = resp["ETag"]
            except BaseException as exc:
                self.failed = self.failed or exc
                raise
            finally:
                self.backend._slots.release()

        self.futures.append(self.backend.pool().submit(upload))

    def commit(self) -> None:
        try:
            if self.upload_id is None:
                data = bytes(self.buf)
                self._call("upload", lambda: self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=data))
                return
            if self.buf:
                self._send()
            wait(self.futures)
            if self.failed is not None:
                raise self.failed
            parts = [{"PartNumber": k, "ETag": self.etags[k]} for k in sorted(self.etags)]
            self._call(
                "complete upload of",
                lambda: self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            self.abort()
            raise
        finally:
            self.buf = bytearray()

    def abort(self) -> None:
        for f in self.futures:
            f.cancel()
        wait(self.futures)
        self.buf = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with contextlib.suppress(Exception):  # the server may be gone; lifecycle rules clean up
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)


class _Spooled(io.RawIOBase):
    """Providers without a per-part API: spool locally (in RAM up to ``part_size``), upload on commit."""

    def __init__(self, backend: MscBackend, path: str, client: Any, key: str) -> None:
        super().__init__()
        self.backend, self.path, self.client, self.key = backend, path, client, key
        self.tmp = tempfile.SpooledTemporaryFile(max_size=backend.part_size, prefix="ckptio-msc-")

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.tmp.write(b)

    def commit(self) -> None:
        try:
            size = self.tmp.tell()
            self.tmp.seek(0)
            if size <= self.backend.part_size:  # small: still in memory, one PUT
                data = self.tmp.read()
                self.backend.call("write", self.path, lambda: self.client.write(self.key, data))
            else:

                def upload() -> None:
                    self.tmp.seek(0)
                    self.client.upload_file(self.key, self.tmp)

                self.backend.call("upload", self.path, upload)
        finally:
            self.tmp.close()

    def abort(self) -> None:
        self.tmp.close()


class MscPosixBackend(Backend):
    """A POSIX ``file`` MSC profile: ckptio's local backend on the profile's physical paths."""

    commit_mode = "rename"
    atomic_create = True

    def __init__(self, url: URL, *, profiles: _Profiles | None = None, **options: Any) -> None:
        super().__init__("msc")
        self.profiles = profiles or _Profiles(options.get("msc_config"))
        self.local = LocalBackend()
        self._bases: dict[str, tuple[str, str]] = {}  # profile -> (base as configured, resolved)

    def _base(self, profile: str, client: Any) -> tuple[str, str]:
        """The profile's physical base path, as MSC spells it and with its links resolved once."""
        if profile not in self._bases:
            base = client.get_posix_path("")
            if base is None:  # pragma: no cover - only POSIX profiles reach here
                raise StorageError(f"msc://{profile}: profile has no POSIX path")
            base = os.path.normpath(str(base))
            self._bases[profile] = (base, os.path.realpath(base))
        return self._bases[profile]

    def lp(self, path: str) -> str:
        profile = path.partition("/")[0]
        client, key = self.profiles.split(path)
        physical = client.get_posix_path(key)
        if physical is None:  # pragma: no cover - only POSIX profiles reach here
            raise StorageError(f"msc://{path}: profile has no POSIX path")
        base, real = self._base(profile, client)
        physical = os.path.normpath(str(physical))
        if physical == base or physical.startswith(base.rstrip("/") + "/"):
            physical = real + physical[len(base) :] if base != "/" else physical
        return physical

    def resolve(self, path: str) -> str:
        """Follow the user's links below the profile's base once (kept when they leave the base)."""
        profile, _, key = path.partition("/")
        client, _ = self.profiles.split(path)
        _, real = self._base(profile, client)
        target = os.path.realpath(self.lp(path))
        if target == real:
            return profile
        if target.startswith(real.rstrip("/") + "/"):
            return f"{profile}/{target[len(real.rstrip('/')) + 1 :]}"
        return path  # outside the profile: the local backend will refuse the link, naming it

    def create_bytes(self, path: str, data: bytes) -> bool:
        return self.local.create_bytes(self.lp(path), data)

    def walk_files(self, path: str) -> Iterator[str]:
        return self.local.walk_files(self.lp(path))

    def url(self, path: str) -> str:
        return f"msc://{path}"

    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.local.open_write(self.lp(path))

    def open_read(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.local.open_read(self.lp(path))

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.local.read_bytes(self.lp(path), offset, length)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        self.local.read_into(self.lp(path), offset, out)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.local.write_bytes(self.lp(path), data)

    def exists(self, path: str) -> bool:
        return self.local.exists(self.lp(path))

    def size(self, path: str) -> int:
        return self.local.size(self.lp(path))

    def listdir(self, path: str) -> list[str]:
        return self.local.listdir(self.lp(path))

    def is_dir(self, path: str) -> bool:
        return self.local.is_dir(self.lp(path))

    def remove(self, path: str, recursive: bool = False) -> None:
        self.local.remove(self.lp(path), recursive)

    def makedirs(self, path: str) -> None:
        self.local.makedirs(self.lp(path))

    def rename(self, src: str, dst: str) -> None:
        self.local.rename(self.lp(src), self.lp(dst))

    def fsync_dir(self, path: str) -> None:
        self.local.fsync_dir(self.lp(path))

    def local_path(self, path: str) -> str | None:
        return self.lp(path)
