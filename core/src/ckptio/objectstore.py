"""The object-store transfer layer: what every cloud backend needs once, written once.

A public toolkit for backend authors (``from ckptio.objectstore import ...``); ``ckptio-fsspec``
and ``ckptio-msc`` are thin adapters over it. It holds:

* :class:`TransferOptions`: part size, multipart threshold, concurrency, memory bound and retry
  policy, declared, documented and validated. :meth:`TransferOptions.pop_from` takes them out of a
  backend's ``storage_options``; what is left is the driver's own pass-through dict, where a key
  close to one of ckptio's (``part_sise``) is refused with a suggestion (:class:`~ckptio.errors.OptionError`).
* :class:`Transfers`: one per backend. Retries every request (:func:`ckptio.retry.retry_call`,
  messages scrubbed of the secrets in the options by one :class:`~ckptio.retry.ErrorMapper`), runs
  parallel ranged reads into a destination buffer (:meth:`Transfers.read_into`), bounds the bytes
  of parts in flight across all writers, and does S3's conditional create.
* :class:`MultipartWriter`: a write-only stream written against a small :class:`PartClient`
  protocol, in the spirit of fsspec's ``AbstractBufferedFile``: it buffers, sends an object of at
  most ``multipart_threshold`` bytes as one PUT and a larger one as parts uploaded concurrently
  within the memory bound, then completes, or aborts on error. :class:`S3Object` is that client for
  any boto3-shaped S3 client (boto3, aiobotocore behind an event loop).
* :class:`ObjectStoreBackend`: a :class:`~ckptio.Backend` base with ``commit_mode = "marker"`` whose
  ``read_into``, ``read_bytes``, ``open_read`` (a seekable stream of ranged reads), ``open_write``
  (commit on a clean exit, abort otherwise) and ``create_bytes`` are built on the above; a
  subclass supplies one ranged GET (:meth:`~ObjectStoreBackend.fetch_range`), an upload
  (:meth:`~ObjectStoreBackend.writer`) and the listing calls.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import inspect
import io
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, Protocol, TypeVar, cast

from .backend import Backend
from .errors import CheckpointError, CorruptCheckpointError, OptionError, StorageAuthError, StorageError
from .options import check_options
from .retry import ErrorMapper, RetryPolicy, after_conditional_failure, retry_call

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_PART_SIZE = 32 * MiB
DEFAULT_CONCURRENCY = 8
#: S3's multipart limits (GCS's XML API has the same): every part but the last at least 5 MiB, at
#: most 5 GiB a part and 10,000 parts an object.
S3_MIN_PART_SIZE = 5 * MiB
S3_MAX_PART_SIZE = 5 << 30
S3_MAX_PARTS = 10_000

#: storage_options keys holding secrets (substrings of the lower-cased key), scrubbed from messages
SECRET_KEY_HINTS = ("key", "secret", "token", "password", "connection", "sas", "credential")
_SECRET_PARTS = ("AccountKey=", "SharedAccessSignature=")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferOptions:
    """How an object-store backend moves bytes; each field is a ``storage_options`` key of that name."""

    part_size: int = DEFAULT_PART_SIZE
    """Bytes per multipart part (every part but the last). S3 wants 5 MiB to 5 GiB
    (:meth:`check_s3_limits`) and at most 10,000 parts an object, so an object may be up to
    ``10,000 x part_size`` (about 312 GiB at the default 32 MiB)."""

    multipart_threshold: int | None = None
    """Objects up to this size go as one PUT, larger ones as a multipart upload; ``None``: two
    parts. An open writer holds up to this much before it knows which (never less than
    ``part_size``; see :attr:`threshold`)."""

    concurrency: int = DEFAULT_CONCURRENCY
    """Requests in flight per backend: parts being uploaded and ranges being read, all open
    writers and readers together (the size of the backend's thread pool)."""

    read_chunk_size: int | None = None
    """Bytes per ranged GET of a large read; ``None``: ``part_size``."""

    max_buffered: int | None = None
    """The memory bound: bytes of parts handed to uploads and not yet stored, per backend, all
    its writers together; ``write()`` blocks while it is reached. ``None``: ``concurrency x
    part_size``; at least ``part_size``. Each open writer holds its filling buffer on top."""

    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    """How each request (a part, a range, a PUT) is retried on transient failures. In
    ``storage_options``: ``attempts`` (5), ``backoff`` (0.2 s, doubling) and ``max_backoff`` (5 s),
    or ``retry=RetryPolicy(...)``."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"storage option {what}")

        need(self.part_size >= 1, f"part_size must be a positive number of bytes, got {self.part_size}")
        need(self.concurrency >= 1, f"concurrency must be at least 1, got {self.concurrency}")
        for name in ("multipart_threshold", "read_chunk_size", "max_buffered"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be a positive number of bytes, got {value}")
        need(
            self.max_buffered is None or self.max_buffered >= self.part_size,
            f"max_buffered ({self.max_buffered}) must be at least part_size ({self.part_size})",
        )
        need(self.retry.attempts >= 1, f"attempts must be at least 1, got {self.retry.attempts}")

    @property
    def threshold(self) -> int:
        """The resolved :attr:`multipart_threshold`."""
        return max(self.part_size, self.multipart_threshold or 2 * self.part_size)

    @property
    def chunk_size(self) -> int:
        """The resolved :attr:`read_chunk_size`."""
        return self.read_chunk_size or self.part_size

    @property
    def memory_bound(self) -> int:
        """The resolved :attr:`max_buffered`."""
        return self.max_buffered or self.concurrency * self.part_size

    def check_s3_limits(self) -> None:
        """Refuse a ``part_size`` S3 multipart uploads cannot use (outside 5 MiB to 5 GiB)."""
        if not S3_MIN_PART_SIZE <= self.part_size <= S3_MAX_PART_SIZE:
            raise ValueError(
                f"part_size must be at least 5 MiB and at most 5 GiB for S3 multipart uploads "
                f"(got {self.part_size})"
            )

    @classmethod
    def pop_from(
        cls,
        options: dict[str, Any],
        *,
        own: Iterable[str] = (),
        driver: Iterable[str] | Callable[[], Iterable[str]] = (),
        where: str = "storage_options",
    ) -> TransferOptions:
        """Take ckptio's keys (:data:`OPTION_KEYS`) out of ``options``; the rest is the driver's.

        ``own`` names the backend's other declared keys (left in ``options``), ``driver`` the
        keywords the driver accepts (or a function listing them, called only when needed). A
        remaining key that is neither but close to a declared one raises
        :class:`~ckptio.errors.OptionError` ("did you mean ...?"); others pass through
        (:func:`check_option_names`). ``where`` names the backend in that message
        (``"the s3:// backend (storage_options)"``).
        """
        found = {k: options.pop(k) for k in OPTION_KEYS if k in options}
        check_option_names(options, (*OPTION_KEYS, *own), driver, where)
        retry = found.pop("retry", None)
        legacy = {
            _RETRY_KEYS[k][0]: _number(k, found.pop(k), _RETRY_KEYS[k][1])
            for k in list(found)
            if k in _RETRY_KEYS
        }
        if retry is None:
            retry = RetryPolicy(**legacy)
        elif legacy or not isinstance(retry, RetryPolicy):
            raise OptionError(
                "storage option 'retry' takes a ckptio.ext.RetryPolicy, and then no attempts/backoff/max_backoff"
            )
        sizes = {k: _number(k, v, int) for k, v in found.items() if v is not None}
        return cls(retry=retry, **sizes)


#: retry keys of storage_options -> (RetryPolicy field, type)
_RETRY_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "attempts": ("attempts", int),
    "backoff": ("base_delay", float),
    "max_backoff": ("max_delay", float),
}
#: every storage_options key :meth:`TransferOptions.pop_from` takes
OPTION_KEYS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(TransferOptions)),
    *_RETRY_KEYS,
)


def _number(key: str, value: Any, conv: Callable[[Any], Any]) -> Any:
    try:
        return conv(value)
    except (TypeError, ValueError):
        raise ValueError(f"storage option {key} must be a number, got {value!r}") from None


def check_option_names(
    options: Mapping[str, Any],
    declared: Iterable[str],
    driver: Iterable[str] | Callable[[], Iterable[str]] = (),
    where: str = "storage_options",
) -> None:
    """Raise :class:`~ckptio.errors.OptionError` for a key of ``options`` that is not declared,
    not one of the ``driver``'s keywords, and close to a declared key (a typo of ckptio's):
    :func:`ckptio.options.check_options` in pass-through mode."""
    check_options(options, declared, where, pass_through=True, accepted=driver)


def accepted_keywords(cls: type) -> set[str]:
    """The keyword arguments a driver class takes: its ``__init__`` parameters along the MRO and
    the ``:param name:`` entries of their docstrings (for ``**kwargs`` that are documented)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            names.update(
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
        for doc in (init.__doc__, klass.__doc__):
            names.update(re.findall(r":param (\w+):", doc or ""))
    return names


def secrets_in(options: Mapping[str, Any]) -> list[str]:
    """Every secret-looking string in ``options`` (nested dicts and lists too), to scrub from messages."""
    out: list[str] = []
    for k, v in options.items():
        values = v if isinstance(v, list) else [v]
        for item in values:
            if isinstance(item, Mapping):
                out += secrets_in(item)
            elif isinstance(item, str) and any(h in str(k).lower() for h in SECRET_KEY_HINTS):
                out.append(item)
                # Azure connection strings: the account key or SAS signature inside
                out += [p.split("=", 1)[1] for p in item.split(";") if p.startswith(_SECRET_PARTS)]
    return out


class PartClient(Protocol):
    """One object's upload API, as :class:`MultipartWriter` drives it. Calls raise the driver's
    errors; the writer retries and maps them."""

    def put(self, data: bytes) -> None:
        """Store the whole object in one request."""

    def start(self) -> str:
        """Start a multipart upload; return its id."""
        ...

    def upload_part(self, upload_id: str, number: int, data: bytes) -> str:
        """Upload part ``number`` (from 1); return its ETag."""
        ...

    def complete(self, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Assemble the object from ``(number, etag)`` pairs, in order."""

    def abort(self, upload_id: str) -> None:
        """Drop the upload and its parts."""


class ConditionalClient(Protocol):
    """What :meth:`Transfers.create_if_absent` needs: a PUT with ``If-None-Match: *``."""

    def put_if_absent(self, data: bytes) -> None:
        """Store the object only if the key is free; a taken key raises 412 PreconditionFailed."""

    def holds(self, data: bytes) -> bool:
        """Whether the object holds exactly ``data`` (read at most ``len(data) + 1`` bytes)."""
        ...


class S3Object:
    """:class:`PartClient` and :class:`ConditionalClient` for one S3 key through a boto3-shaped
    client: ``invoke(operation, **params)`` runs e.g. ``put_object(Bucket=..., Key=...)`` and
    returns its response; ``read_body`` reads a response's ``Body`` stream."""

    def __init__(
        self,
        invoke: Callable[..., Any],
        bucket: str,
        key: str,
        read_body: Callable[[Any], bytes] = lambda body: bytes(body.read()),
    ) -> None:
        self.invoke, self.bucket, self.key, self.read_body = invoke, bucket, key, read_body

    def _call(self, operation: str, **params: Any) -> Any:
        return self.invoke(operation, Bucket=self.bucket, Key=self.key, **params)

    def put(self, data: bytes) -> None:
        self._call("put_object", Body=data)

    def put_if_absent(self, data: bytes) -> None:
        self._call("put_object", Body=data, IfNoneMatch="*")

    def holds(self, data: bytes) -> bool:
        if not data:
            return int(self._call("head_object").get("ContentLength", -1)) == 0
        resp = self._call(
            "get_object", Range=f"bytes=0-{len(data)}"
        )  # one byte more: a longer object differs
        return self.read_body(resp["Body"]) == data

    def start(self) -> str:
        return str(self._call("create_multipart_upload")["UploadId"])

    def upload_part(self, upload_id: str, number: int, data: bytes) -> str:
        return str(self._call("upload_part", UploadId=upload_id, PartNumber=number, Body=data)["ETag"])

    def complete(self, upload_id: str, parts: list[tuple[int, str]]) -> None:
        done = {"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]}
        self._call("complete_multipart_upload", UploadId=upload_id, MultipartUpload=done)

    def abort(self, upload_id: str) -> None:
        self._call("abort_multipart_upload", UploadId=upload_id)


class _Budget:
    """Bytes in flight, bounded: ``acquire`` waits while the bound would be passed (one item larger
    than the bound still goes, alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class Transfers:
    """One backend's transfer machinery: options, retries and error mapping, a thread pool of
    ``concurrency`` workers and the memory bound, shared by all its readers and writers."""

    def __init__(
        self, options: TransferOptions, errors: ErrorMapper | None = None, name: str = "ckptio"
    ) -> None:
        self.options = options
        self.errors = errors or ErrorMapper()
        self.budget = _Budget(options.memory_bound)
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def call(self, action: str, url: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient failures; other failures raise ckptio errors naming ``url``."""
        return retry_call(fn, self.options.retry, self.errors, action, url)

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix=self._name)
            return self._pool.submit(fn)

    def read_into(self, url: str, offset: int, out: memoryview, fetch: Callable[[int, int], bytes]) -> None:
        """Fill ``out`` with bytes ``[offset, offset + len(out))``: ``fetch(start, end)`` (one
        ranged GET) per ``read_chunk_size`` piece, in parallel, each copied into its slice."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        n, step = len(out), self.options.chunk_size

        def piece(lo: int, hi: int) -> None:
            data = self.call("read", url, lambda: fetch(offset + lo, offset + hi))
            if len(data) != hi - lo:
                raise CorruptCheckpointError(
                    f"{url} is truncated: wanted {n} bytes at offset {offset}, got {lo + len(data)}", path=url
                )
            out[lo:hi] = data

        ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        if len(ranges) <= 1:
            for lo, hi in ranges:
                piece(lo, hi)
            return
        futures = [self.submit(functools.partial(piece, lo, hi)) for lo, hi in ranges]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:  # after a failure, nothing may write into `out` once this returns
            f.cancel()
        wait(futures)
        for f in futures:
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                raise exc

    def create_if_absent(self, client: ConditionalClient, url: str, data: bytes) -> bool:
        """Create the object only if absent (``If-None-Match: *``); return whether this call did.

        On 412 the object is read back: exactly ``data`` means a put of ours whose answer was lost
        (callers put a unique token in ``data``). A 409 conflict is retried, then counts as lost
        (:func:`ckptio.retry.after_conditional_failure`).
        """
        policy = self.options.retry
        for attempt in range(policy.attempts):
            try:
                client.put_if_absent(data)
                return True
            except CheckpointError:
                raise
            except Exception as exc:
                action = after_conditional_failure(exc, attempt, policy)
                if action == "exists":
                    return self.call("read back", url, lambda: client.holds(data))
                if action == "lost":
                    return False
                if action == "raise":
                    raise self.errors.to_ckptio(exc, "create", url, attempt + 1) from exc
                time.sleep(policy.delay(attempt))
        return False  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class MultipartWriter(io.RawIOBase):
    """A write-only stream that becomes one object on :meth:`commit` (nothing on :meth:`abort`).

    It buffers up to ``multipart_threshold`` bytes; an object that ends there is one
    :meth:`PartClient.put` (one request, no copy). Past it, the buffer is cut into
    ``part_size`` parts and each later part is sent as soon as it is full, on the transfer pool,
    while the caller keeps writing; ``write()`` blocks while the parts in flight reach the memory
    bound. Each part is retried on its own; the first failure is raised by the next ``write()`` or
    by :meth:`commit`, which then aborts the upload.
    """

    def __init__(self, client: PartClient, transfers: Transfers, url: str) -> None:
        super().__init__()
        self.client, self.transfers, self.url = client, transfers, url
        self.part_size = transfers.options.part_size
        self.threshold = transfers.options.threshold
        self.upload_id: str | None = None
        self.next_part = 1
        self._buf = io.BytesIO()
        self._etags: dict[int, str] = {}
        self._futures: list[Future[None]] = []
        self._failed: BaseException | None = None
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n, pos = len(mv), 0
        while pos < n:
            self._check()
            limit = self.threshold if self.upload_id is None else self.part_size
            room = limit - self._buf.tell()
            if room <= 0:  # full, and more is coming
                self._cut()
                continue
            take = min(room, n - pos)
            self._buf.write(mv[pos : pos + take])
            pos += take
        return n

    def _take(self) -> bytes:
        data, self._buf = self._buf.getvalue(), io.BytesIO()  # getvalue() hands the buffer over, uncopied
        return data

    def _cut(self) -> None:
        data = self._take()
        if self.upload_id is not None:
            self._send(data)
            return
        self.upload_id = self.transfers.call("start upload of", self.url, self.client.start)
        if len(data) <= self.part_size:
            self._send(data)
            return
        view = memoryview(data)
        for lo in range(0, len(data), self.part_size):
            self._send(bytes(view[lo : lo + self.part_size]))  # bytes: botocore streams others slowly

    def _send(self, data: bytes) -> None:
        number, upload_id, size = self.next_part, self.upload_id, len(data)
        assert upload_id is not None
        if number > S3_MAX_PARTS:
            raise StorageError(
                f"upload of {self.url}: more than {S3_MAX_PARTS} parts of {self.part_size} bytes; "
                "raise part_size in storage_options"
            )
        self.next_part += 1
        self.transfers.budget.acquire(size)

        def upload() -> None:
            etag = self.transfers.call(
                f"upload part {number} of", self.url, lambda: self.client.upload_part(upload_id, number, data)
            )
            with self._lock:
                self._etags[number] = etag

        def done(f: Future[None]) -> None:
            self.transfers.budget.release(size)
            if not f.cancelled() and f.exception() is not None and self._failed is None:
                self._failed = f.exception()

        fut = self.transfers.submit(upload)
        fut.add_done_callback(done)
        self._futures.append(fut)

    def _check(self) -> None:
        exc = self._failed
        if exc is not None:
            raise (
                exc
                if isinstance(exc, CheckpointError)
                else StorageError(f"upload of {self.url} failed: {exc!r}")
            )

    def commit(self) -> None:
        """Send what is buffered and complete the object (or put it whole when it is small)."""
        try:
            if self.upload_id is None:
                data = self._take()
                self.transfers.call("upload", self.url, lambda: self.client.put(data))
                return
            if self._buf.tell():
                self._send(self._take())
            wait(self._futures)
            self._check()
            upload_id, parts = self.upload_id, sorted(self._etags.items())
            self.transfers.call(
                "complete upload of", self.url, lambda: self.client.complete(upload_id, parts)
            )
            self.upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            super().close()

    def abort(self) -> None:
        """Cancel pending parts and abort the upload (best effort, never raises)."""
        for f in self._futures:
            f.cancel()
        wait(self._futures)
        self._buf = io.BytesIO()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with contextlib.suppress(Exception):  # the server may be gone; lifecycle rules clean up
                self.client.abort(upload_id)
        if not self.closed:
            super().close()

    def close(self) -> None:
        """Closing is :meth:`commit`'s or :meth:`abort`'s; a bare ``close()`` is ignored."""


class Upload(Protocol):
    """What :meth:`ObjectStoreBackend.writer` returns: a stream that is committed or aborted."""

    def write(self, b: Any) -> int: ...

    def commit(self) -> None:
        """Make the object appear, whole; on failure leave nothing and raise."""

    def abort(self) -> None:
        """Leave nothing behind (best effort, never raises)."""


class RangedReader(io.RawIOBase):
    """A seekable raw stream over an object of known ``size``, read by ``read_into(offset, view)``."""

    def __init__(self, read_into: Callable[[int, memoryview], None], size: int) -> None:
        super().__init__()
        self._read_into, self.size, self.pos = read_into, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.size - self.pos))
        if n:
            self._read_into(self.pos, mv[:n])
            self.pos += n
        return n


class ObjectStoreBackend(Backend):
    """A backend on an object store: ``marker`` commits, transfers through :class:`Transfers`.

    Subclasses implement :meth:`fetch_range`, :meth:`writer`, ``exists``, ``size``, ``listdir``
    and ``remove``; for an atomic :meth:`create_bytes` they set ``atomic_create = True`` and return
    a client from :meth:`conditional_client`.
    """

    commit_mode = "marker"

    def __init__(self, scheme: str, transfers: Transfers, **options: Any) -> None:
        super().__init__(scheme, **options)
        self.transfers = transfers
        self.transfer = transfers.options
        self.errors = transfers.errors

    def url(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    def call(self, action: str, path: str, fn: Callable[[], T]) -> T:
        """``fn()`` with retries; failures raise ckptio errors naming ``path``'s URL, secrets scrubbed."""
        return self.transfers.call(action, self.url(path), fn)

    # -- to implement -----------------------------------------------------------------------
    @abc.abstractmethod
    def fetch_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``path`` in one request (retried by the caller)."""

    @abc.abstractmethod
    def writer(self, path: str) -> Upload:
        """A new upload of ``path`` (usually a :class:`MultipartWriter` over a :class:`PartClient`)."""

    def conditional_client(self, path: str) -> ConditionalClient | None:
        """The client of an atomic :meth:`create_bytes`, ``None`` when the store has none."""
        return None

    def changed(self, path: str) -> None:
        """Called once ``path`` was written or its upload dropped (to forget cached listings)."""

    # -- built on the above -------------------------------------------------------------------
    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Parallel ranged GETs of ``read_chunk_size`` bytes, each copied into its slice of ``out``;
        a range past the end of the object is :class:`~ckptio.errors.CorruptCheckpointError`."""
        url = self.url(path)
        try:
            self.transfers.read_into(url, offset, out, lambda lo, hi: self.fetch_range(path, lo, hi))
        except StorageError as exc:  # S3 answers a range that starts past the end with 416
            size = None if isinstance(exc, StorageAuthError) else self.size(path)
            if size is None or offset + out.nbytes <= size:
                raise
            raise CorruptCheckpointError(
                f"{url} is truncated: wanted {out.nbytes} bytes at offset {offset}, got {max(0, size - offset)}",
                path=url,
            ) from exc

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Up to ``length`` bytes at ``offset``: fewer at the end of the object, ``b""`` past it."""
        if length is not None and length <= self.transfer.chunk_size:  # one GET, no HEAD first
            if length == 0:
                return b""
            try:
                return self.call("read", path, lambda: self.fetch_range(path, offset, offset + length))
            except StorageError as exc:
                if isinstance(exc, StorageAuthError) or offset < self.size(path):
                    raise
                return b""
        end = self.size(path)
        n = max(0, end - offset) if length is None else max(0, min(length, end - offset))
        out = bytearray(n)
        self.read_into(path, offset, memoryview(out))
        return bytes(out)

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        size = self.size(path)
        raw = RangedReader(lambda offset, out: self.read_into(path, offset, out), size)
        with io.BufferedReader(raw, buffer_size=max(1, min(size, self.transfer.chunk_size))) as f:
            yield f

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        upload = self.writer(path)
        try:
            try:
                yield cast(BinaryIO, upload)
            except BaseException:
                upload.abort()
                raise
            upload.commit()
        finally:
            self.changed(path)

    def create_bytes(self, path: str, data: bytes) -> bool:
        client = self.conditional_client(path)
        if client is None:
            return super().create_bytes(path, data)
        try:
            return self.transfers.create_if_absent(client, self.url(path), bytes(data))
        finally:
            self.changed(path)

    def close(self) -> None:
        self.transfers.close()


__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "OPTION_KEYS",
    "S3_MAX_PARTS",
    "S3_MAX_PART_SIZE",
    "S3_MIN_PART_SIZE",
    "ConditionalClient",
    "MultipartWriter",
    "ObjectStoreBackend",
    "PartClient",
    "RangedReader",
    "S3Object",
    "TransferOptions",
    "Transfers",
    "Upload",
    "accepted_keywords",
    "check_option_names",
    "secrets_in",
]
