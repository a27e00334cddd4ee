"""POSIX backend: durable writes, atomic renames, ``preadv`` straight into tensors.

Durability is what a checkpoint on local disk needs most: every data file is fsynced when closed,
small files are written to a temporary name, fsynced and renamed (readers never see half a
``latest`` pointer), and directories are fsynced after entries are added or renamed. The commit
mode is ``rename``: a checkpoint directory appears under its final name in one ``rename(2)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from ckptio.backend import Backend
from ckptio.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageAuthError, StorageError
from ckptio.url import URL


@contextlib.contextmanager
def _os_errors(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{path}: no such file or directory") from exc
    except PermissionError as exc:
        raise StorageAuthError(f"{path}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"{path}: no space left on device") from exc
        raise StorageError(f"{path}: {exc.strerror or exc}") from exc


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    """``rmtree`` error handler: an entry someone else removed first is not an error."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def _load_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _WriteBehind(io.RawIOBase):
    """A file that starts writeback of each ``window`` of bytes as soon as it is written.

    A plain write-then-fsync copies everything into the page cache first and only then waits for
    the disk, so a durable save costs copy time *plus* disk time. Kicking off writeback per window
    (``sync_file_range``) overlaps the two, and waiting for the window before last bounds the
    dirty memory a save leaves behind to about two windows per file.
    """

    def __init__(self, f: Any, window: int = 32 << 20) -> None:
        super().__init__()
        self._f = f
        self._fd = f.fileno()
        self._window = window
        self._pos = 0
        self._submitted = 0
        self._previous: tuple[int, int] | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._f.write(view[done:])
        self._pos += done
        if _sync_file_range is not None and self._pos - self._submitted >= self._window:
            start, length = self._submitted, self._pos - self._submitted
            _sync_file_range(self._fd, start, length, _SFR_WRITE)
            if self._previous is not None:
                _sync_file_range(self._fd, *self._previous, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            self._previous = (start, length)
            self._submitted = self._pos
        return done


class LocalBackend(Backend):
    """Files on a local or shared POSIX file system.

    :param fsync: fsync files and directories (default ``True``); turn off only for scratch data.
    """

    commit_mode = "rename"

    def __init__(self, url: URL | None = None, *, fsync: bool = True, **options: Any) -> None:
        super().__init__("file", **options)
        self.fsync = fsync

    # -- writes -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        with _os_errors(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            f = open(path, "wb", buffering=0)
        try:
            yield _WriteBehind(f) if self.fsync else f  # type: ignore[misc]
            with _os_errors(path):
                if self.fsync:
                    os.fsync(f.fileno())
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            f.close()

    def write_bytes(self, path: str, data: bytes) -> None:
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        with _os_errors(path):
            os.makedirs(directory, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            self.fsync_dir(directory)

    def makedirs(self, path: str) -> None:
        with _os_errors(path):
            os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        with _os_errors(src):
            os.rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        if not self.fsync:
            return
        with _os_errors(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, path: str, recursive: bool = False) -> None:
        with _os_errors(path):
            if os.path.isdir(path) and not os.path.islink(path):
                if recursive:
                    # entries may vanish concurrently (retention and leftover cleanup both delete)
                    shutil.rmtree(path, onerror=_ignore_missing)
                else:
                    os.rmdir(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    # -- reads ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        with _os_errors(path):
            f = open(path, "rb")
        with f:
            yield f

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        with _os_errors(path), open(path, "rb", buffering=0) as f:
            if length is None:
                f.seek(offset)
                return f.read()
            return os.pread(f.fileno(), length, offset)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        with _os_errors(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                done, total = 0, len(out)
                while done < total:
                    n = os.preadv(fd, [out[done : min(total, done + (1 << 30))]], offset + done)
                    if n == 0:
                        raise CorruptCheckpointError(
                            f"{path} is truncated: wanted {total} bytes at offset {offset}, got {done}",
                            path=path,
                        )
                    done += n
            finally:
                os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        with _os_errors(path):
            return os.path.getsize(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except PermissionError as exc:
            raise StorageAuthError(f"{path}: permission denied") from exc

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def local_path(self, path: str) -> str | None:
        return path

    def url(self, path: str) -> str:
        return path
