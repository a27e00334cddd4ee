"""Parallel S3 multipart upload behind a plain ``write()`` stream.

s3fs's own writer uploads one block at a time; a checkpoint file is hundreds of MiB, so this
writer fills ``part_size`` buffers and uploads each as a part on s3fs's event loop while the caller
keeps writing. A backend-wide semaphore allows ``concurrency`` parts in flight: when the store is
slower than the writer, ``write()`` blocks, so memory is bounded by the parts in flight (each
copied once to ``bytes``; botocore may hold another copy while sending) plus one filling buffer per
open writer: about ``part_size x (2 x concurrency + writers)``, whatever the file size.

An object of at most ``multipart_threshold`` bytes (default two parts) is sent with a single
``PutObject``: one request instead of at least three, and the store need not assemble parts; full
parts are held back until the stream outgrows the threshold, which adds that much per open writer. When the body of
``open_write`` raises, pending parts are cancelled and the upload is aborted, so nothing appears.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
from typing import TYPE_CHECKING, Any

from ckptio.errors import CheckpointError, StorageError
from ckptio.ext import aretry_call

if TYPE_CHECKING:
    from .backend import FsspecBackend


class S3MultipartWriter(io.RawIOBase):
    """A write-only stream that becomes one S3 object on :meth:`commit` (see the module doc)."""

    def __init__(self, backend: FsspecBackend, path: str) -> None:
        super().__init__()
        self.backend = backend
        self.path = path
        self.url = backend.url(path)
        self.bucket, _, self.key = backend.fspath(path).partition("/")
        self.part_size = backend.part_size
        self.threshold = backend.multipart_threshold
        self.held: list[bytearray] = []  # full parts kept while the object may still fit one PutObject
        self.buf: bytearray | None = None
        self.fill = 0
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.futures: list[concurrent.futures.Future[None]] = []
        self.next_part = 1
        self.failed: BaseException | None = None
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    # -- caller side --------------------------------------------------------------------------
    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n, pos = len(mv), 0
        while pos < n:
            if self.failed is not None:
                raise self._failure()
            if self.buf is not None and self.fill == self.part_size:
                # a full part and more data coming: hold it while the object may still be one
                # PutObject, else start (or continue) the multipart upload
                if self.upload_id is None and (len(self.held) + 1) * self.part_size < self.threshold:
                    self.held.append(self.buf)
                    self.buf = None
                else:
                    self._send_part()
            if self.buf is None:
                self.buf = self.backend.take_buffer()
                self.fill = 0
            take = min(self.part_size - self.fill, n - pos)
            self.buf[self.fill : self.fill + take] = mv[pos : pos + take]
            self.fill += take
            pos += take
        return n

    def _failure(self) -> CheckpointError:
        exc = self.failed
        if isinstance(exc, CheckpointError):
            return exc
        return StorageError(f"upload of {self.url} failed: {exc!r}")

    def _run(self, coro_fn: Any) -> Any:
        return self.backend._sync(coro_fn)

    def _retry(self, action: str, fn: Any) -> Any:
        return aretry_call(fn, self.backend.policy, self.backend.errors, action, self.url)

    async def _s3(self) -> Any:
        await self.backend.fs.set_session()  # a no-op once connected; other ranks may not be yet
        return await self.backend.fs.get_s3(self.bucket)

    def _send_part(self) -> None:
        """Send the filling buffer as the next part (starting the upload, and sending the parts
        held back so far, the first time)."""
        if self.upload_id is None:

            async def create() -> str:
                s3 = await self._s3()
                resp = await self._retry(
                    "start upload of", lambda: s3.create_multipart_upload(Bucket=self.bucket, Key=self.key)
                )
                return str(resp["UploadId"])

            self.upload_id = self._run(create)
            current, fill = self.buf, self.fill
            for part in self.held:
                self.buf, self.fill = part, self.part_size
                self._send_part()
            self.held = []
            self.buf, self.fill = current, fill
        assert self.buf is not None
        buf, size, num = self.buf, self.fill, self.next_part
        self.buf, self.fill, self.next_part = None, 0, num + 1
        self.backend._slots.acquire()  # bounded memory: wait while `concurrency` parts are in flight

        # botocore sends a bytearray body as a chunked stream with a trailing checksum, which
        # servers (moto markedly) handle far slower than a plain bytes body: copy once to bytes and
        # recycle the buffer at once, so memory is still one part per slot plus the filling buffer.
        body = bytes(memoryview(buf)[:size])
        self.backend.give_buffer(buf)

        async def upload() -> None:
            s3 = await self._s3()
            resp = await self._retry(
                f"upload part {num} of",
                lambda: s3.upload_part(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=num, Body=body
                ),
            )
            with self._lock:
                self.etags[num] = resp["ETag"]

        fut = asyncio.run_coroutine_threadsafe(upload(), self.backend.fs.loop)

        def done(f: concurrent.futures.Future[None]) -> None:
            self.backend._slots.release()
            if not f.cancelled() and f.exception() is not None and self.failed is None:
                self.failed = f.exception()

        fut.add_done_callback(done)
        self.futures.append(fut)

    # -- end ----------------------------------------------------------------------------------
    def commit(self) -> None:
        """Upload what is buffered and complete the object (or put it whole when it is small)."""
        try:
            if self.upload_id is None:
                pieces = [memoryview(p) for p in self.held]
                if self.buf is not None:
                    pieces.append(memoryview(self.buf)[: self.fill])
                data = b"".join(pieces)
                del pieces
                self._release_buffers()

                async def put() -> None:
                    s3 = await self._s3()
                    await self._retry(
                        "upload", lambda: s3.put_object(Bucket=self.bucket, Key=self.key, Body=data)
                    )

                self._run(put)
                return
            if self.fill:
                self._send_part()
            concurrent.futures.wait(self.futures)
            if self.failed is not None:
                raise self._failure()
            parts = [{"PartNumber": k, "ETag": self.etags[k]} for k in sorted(self.etags)]

            async def complete() -> None:
                s3 = await self._s3()
                await self._retry(
                    "complete upload of",
                    lambda: s3.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                )

            self._run(complete)
        except BaseException:
            self.abort()
            raise
        finally:
            self.backend.fs.invalidate_cache(self.backend.fspath(self.path))
            super().close()

    def _release_buffers(self) -> None:
        """Give the held parts and the filling buffer back to the backend's pool."""
        for part in [*self.held, *([self.buf] if self.buf is not None else [])]:
            self.backend.give_buffer(part)
        self.held, self.buf = [], None

    def abort(self) -> None:
        """Cancel pending parts and abort the multipart upload (best effort, never raises)."""
        for f in self.futures:
            f.cancel()
        concurrent.futures.wait(self.futures)
        self._release_buffers()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None

            async def abort() -> None:
                s3 = await self._s3()
                await s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)

            try:
                self._run(abort)
            except Exception:  # the server may be gone; S3 lifecycle rules clean up orphans
                pass
        if not self.closed:
            super().close()

    def close(self) -> None:
        """Closing is done by :meth:`commit`/:meth:`abort`; a bare ``close()`` is ignored."""
