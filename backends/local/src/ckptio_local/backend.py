"""POSIX backend: durable writes, atomic renames, ``preadv`` straight into tensors.

Durability is what a checkpoint on local disk needs most: every data file is fsynced when closed,
small files are written to a temporary name, fsynced and renamed (readers never see half a
``latest`` pointer), and directories are fsynced after entries are added or renamed. The commit
mode is ``rename``: a checkpoint directory appears under its final name in one ``rename(2)``.

**Symlinks and special files.** A checkpoint may come from someone else, so this backend never
follows a symbolic link below the path the user gave:

* :meth:`LocalBackend.resolve` follows the links in the user's own root once (a run directory that
  links to another disk is saved *through*, never replaced). Every path the core builds below the
  resolved root is therefore canonical, and the rule is simple: **a path handed to this backend
  must contain no symlink at all**, in any component.
* On Linux every open is one ``openat2(2)`` with ``RESOLVE_NO_SYMLINKS``: the kernel refuses a link
  anywhere in the path, with no race between a check and the open (about 1.5 us more than a plain
  ``open``). Elsewhere, or where a seccomp filter hides ``openat2``, the path is walked one
  directory at a time with ``O_NOFOLLOW`` (as race-free, ~30 us per open for a deep path).
* Reads (:meth:`~LocalBackend.open_read`, :meth:`~LocalBackend.read_bytes`,
  :meth:`~LocalBackend.read_into`, :meth:`~LocalBackend.size`) accept regular files only. A
  symlink, FIFO, device, socket or directory raises :class:`~ckptio.errors.UnsafeCheckpointError`
  naming the path and what it is; files are opened ``O_NONBLOCK`` so a FIFO cannot hang.
  ``read_bytes`` never reads past the size ``fstat`` reported, so a file cannot make it allocate
  more than its size.
* Queries treat anything reached *through* a link as absent: :meth:`~LocalBackend.exists` is
  ``False`` for ``step/manifest.json`` when ``step`` is a link (so a linked step never looks
  committed), :meth:`~LocalBackend.listdir` and :meth:`~LocalBackend.walk_files` do not descend
  into linked directories, :meth:`~LocalBackend.is_dir` is ``False`` for a link. A link itself
  *exists* and is listed under its name: reading it raises, removing it removes the link only.
* :meth:`~LocalBackend.remove` deletes through directory file descriptors: a link is unlinked, a
  tree is removed without following links inside it, and a path reached through a link raises
  :class:`~ckptio.errors.UnsafeCheckpointError` (nothing outside the root is ever deleted).

**Temporary files.** :meth:`~LocalBackend.write_bytes` and :meth:`~LocalBackend.create_bytes` write
``.<name>.<16 hex>.tmp`` beside the target and remove it on any failure; one left by a killed
process matches :func:`is_temp_name` and may be deleted by whoever cleans the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from ckptio.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageAuthError,
    StorageError,
    UnsafeCheckpointError,
)
from ckptio.ext import URL, Backend, check_options

_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8,32}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a base name) is a temporary file of :meth:`LocalBackend.write_bytes`."""
    return bool(_TEMP_RE.match(name))


def _temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(8)}.tmp"


# -- opening without following links ------------------------------------------------------------
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_PATH = getattr(os, "O_PATH", 0)
#: directories the fallback walk passes through (O_PATH needs search permission only)
_O_WALK = (_O_PATH or os.O_RDONLY) | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
_O_DIR = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC
_O_READ = os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC
#: errors an open gives when it meets a link (ELOOP; EMLINK on BSDs) or a special file (ENXIO)
_SUSPECT = frozenset({errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENXIO})


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_openat2() -> Callable[[str, int], int] | None:
    """``openat2(AT_FDCWD, path, {flags, RESOLVE_NO_SYMLINKS})`` on Linux >= 5.6, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(_OpenHow),
        ctypes.c_size_t,
    ]
    nr_openat2, at_fdcwd, resolve_no_symlinks = 437, -100, 0x04  # same number on every Linux arch

    hows: dict[int, _OpenHow] = {}  # one read-only struct per flag set (the kernel only reads it)
    size = ctypes.sizeof(_OpenHow)

    def openat2(path: str, flags: int) -> int:
        how = hows.get(flags)
        if how is None:
            how = hows[flags] = _OpenHow(flags | _O_NOFOLLOW | _O_CLOEXEC, 0, resolve_no_symlinks)
        raw = os.fsencode(path)
        if b"\0" in raw:  # c_char_p would cut the path there: refuse, as os.open does
            raise OSError(errno.EINVAL, "embedded null byte", path)
        fd = syscall(nr_openat2, at_fdcwd, raw, ctypes.byref(how), size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(fd)

    try:  # old kernels answer ENOSYS; container seccomp filters ENOSYS or EPERM
        os.close(openat2("/", _O_DIR))
    except OSError:
        return None
    return openat2


_openat2 = _load_openat2()


def _walk_open(path: str, flags: int, mode: int = 0o666) -> int:
    """Open ``path`` one component at a time with ``O_NOFOLLOW`` (where ``openat2`` is missing)."""
    if "\0" in path:
        raise OSError(errno.EINVAL, "embedded null byte", path)
    parts = [p for p in os.path.abspath(path).split("/") if p]
    fd = os.open("/", _O_WALK)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _O_WALK, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1] if parts else ".", flags | _O_NOFOLLOW | _O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def _open(path: str, flags: int) -> int:
    """Open ``path`` with ``flags``; raises ``OSError`` if any component is a symlink."""
    if _openat2 is not None:
        return _openat2(path if path.startswith("/") else os.path.abspath(path), flags)
    return _walk_open(path, flags)


def _split(path: str) -> tuple[str, str]:
    if "\0" in path:
        raise OSError(errno.EINVAL, "embedded null byte", path)
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise StorageError(f"{path}: not a file path")
    return parent, name


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _unsafe(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: {what}; ckptio reads only regular files and never follows links inside a checkpoint",
        path=path,
    )


def _diagnose(path: str) -> UnsafeCheckpointError | None:
    """After a suspicious open error: the first link on the way to ``path``, or a special file."""
    cur = "/"
    parts = [p for p in os.path.abspath(path).split("/") if p]
    for i, part in enumerate(parts):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):
                target = os.readlink(cur)
                where = "" if cur == os.path.abspath(path) else f"{cur}, on the way to it, "
                return _unsafe(path, f"{where}is a symbolic link (to {target!r})")
            return _unsafe(path, f"{cur} is a symbolic link")
        if i == len(parts) - 1 and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            return _unsafe(path, f"is {_kind(st.st_mode)}")
    return None


def _error(exc: OSError, path: str, *others: str) -> CheckpointError:
    """The ckptio error for ``exc``; a link met on the way (to any of the paths) is unsafe."""
    if exc.errno in _SUSPECT:
        for p in (path, *others):
            unsafe = _diagnose(p)
            if unsafe is not None:
                return unsafe
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{path}: no such file or directory")
    if isinstance(exc, PermissionError):
        return StorageAuthError(f"{path}: permission denied")
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{path}: no space left on device")
    return StorageError(f"{path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _os_errors(path: str, *others: str) -> Iterator[None]:
    """Map ``OSError`` to ckptio errors (see :func:`_error`)."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as exc:
        raise _error(exc, path, *others) from exc


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """A blocking fd on the regular file ``path`` and its ``fstat``; anything else is unsafe."""
    try:
        fd = _open(path, _O_READ)
    except OSError as exc:
        raise _error(exc, path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, f"is {_kind(st.st_mode)}")
        if _O_NONBLOCK:  # some network/FUSE file systems honour O_NONBLOCK on files: clear it
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # (one call: no other status flag was set)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _lstat(path: str) -> os.stat_result:
    """``lstat`` of ``path`` with no link followed on the way (``OSError`` otherwise)."""
    if _openat2 is not None and _O_PATH:  # O_PATH|O_NOFOLLOW: a trailing link opens the link itself
        fd = _open(path, _O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    parent, name = _split(path)
    dfd = _open(parent, _O_DIR)
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(dfd)


def _ensure_dir(path: str) -> int:
    """An fd on directory ``path``, creating it and its parents; never through a link."""
    try:
        return _open(path, _O_DIR)
    except FileNotFoundError:
        pass
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise FileNotFoundError(errno.ENOENT, "no root directory", path)
    pfd = _ensure_dir(parent)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=pfd)
        return os.open(name, _O_DIR | _O_NOFOLLOW, dir_fd=pfd)
    finally:
        os.close(pfd)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _rmtree(name: str, dfd: int, full: str) -> None:
    """Remove the directory ``name`` in ``dfd`` without following any link inside it."""
    kwargs: dict[str, Any]
    if sys.version_info >= (3, 12):
        kwargs = {"onexc": _ignore_missing_exc}
    else:
        kwargs = {"onerror": _ignore_missing}
    if sys.version_info >= (3, 11) and getattr(shutil.rmtree, "avoids_symlink_attacks", False):
        shutil.rmtree(name, dir_fd=dfd, **kwargs)
    else:  # Python 3.10: ``full`` was just checked link-free; rmtree itself never follows links
        shutil.rmtree(full, **kwargs)


def _ignore_missing_exc(func: Any, path: str, exc: BaseException) -> None:
    """``rmtree`` error handler (Python >= 3.12): an entry removed by someone else is fine."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


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
    """Files on a local or shared POSIX file system (see the module docstring for the link rules).

    :param fsync: fsync files and directories (default ``True``); turn off only for scratch data.

    These are its only ``storage_options``: any other name raises :class:`~ckptio.OptionError`
    naming the closest one (a misspelt ``fsync`` must not silently keep or drop durability).
    """

    commit_mode = "rename"
    atomic_create = True
    #: The ``storage_options`` this backend declares (the keyword-only parameters of ``__init__``).
    STORAGE_OPTIONS = ("fsync",)

    def __init__(self, url: URL | None = None, *, fsync: bool = True, **unknown: Any) -> None:
        scheme = url.scheme if url is not None else "file"
        check_options(unknown, self.STORAGE_OPTIONS, f"the {scheme}:// backend (storage_options)")
        super().__init__("file")
        self.fsync = fsync

    def resolve(self, path: str) -> str:
        """Follow the links in the user's own root, once; below it nothing is followed."""
        return os.path.realpath(path)

    # -- writes -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        with _os_errors(path):
            parent, name = _split(path)
            dfd = _ensure_dir(parent)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
                fd = os.open(name, flags, 0o666, dir_fd=dfd)
            except BaseException:
                os.close(dfd)
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise _unsafe(path, f"is {_kind(st.st_mode)}")
            os.set_blocking(fd, True)
            f = open(fd, "wb", buffering=0)
        except BaseException:
            os.close(dfd)
            raise
        try:
            yield _WriteBehind(f) if self.fsync else f  # type: ignore[misc]
            with _os_errors(path):
                if self.fsync:
                    os.fsync(f.fileno())
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        finally:
            f.close()
            os.close(dfd)

    def _write_new(self, dfd: int, name: str, data: Any) -> bool:
        """Create ``name`` in ``dfd`` holding ``data`` (fsynced), never through a link; ``False``
        when it already exists. A failed write removes what it created."""
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666, dir_fd=dfd
            )
        except FileExistsError:
            return False
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        finally:
            os.close(fd)
        return True

    def _via_temp(self, path: str, data: Any, publish: Callable[[int, str, str], bool]) -> bool:
        """Write ``data`` to a temporary file beside ``path``, then ``publish(dfd, tmp, name)``.

        The temporary file is gone afterwards whatever happens, and the directory is fsynced
        when ``publish`` says it put the file in place.
        """
        with _os_errors(path):
            parent, name = _split(path)
            dfd = _ensure_dir(parent)
            try:
                tmp = _temp_name(name)
                if not self._write_new(dfd, tmp, data):
                    raise FileExistsError(errno.EEXIST, "temporary name already taken", tmp)
                try:
                    done = publish(dfd, tmp, name)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=dfd)
                if done and self.fsync:
                    os.fsync(dfd)
                return done
            finally:
                os.close(dfd)

    def write_bytes(self, path: str, data: bytes) -> None:
        def replace(dfd: int, tmp: str, name: str) -> bool:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return True

        self._via_temp(path, data, replace)

    def create_bytes(self, path: str, data: bytes) -> bool:
        """Atomic: a complete temporary file is ``link(2)``-ed to ``path``, which fails if it exists.

        Readers never see a partial file. On file systems without hard links (some FUSE/SMB
        mounts) it falls back to ``O_EXCL`` on ``path`` itself: still one winner, but the content
        is visible while it is written.
        """

        def link(dfd: int, tmp: str, name: str) -> bool:
            try:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                    raise
                return self._write_new(dfd, name, data)
            return True

        return self._via_temp(path, data, link)

    def makedirs(self, path: str) -> None:
        with _os_errors(path):
            os.close(_ensure_dir(path))

    def rename(self, src: str, dst: str) -> None:
        with _os_errors(src, dst):
            (sparent, sname), (dparent, dname) = _split(src), _split(dst)
            sfd = _open(sparent, _O_DIR)
            try:
                dfd = _open(dparent, _O_DIR)
                try:
                    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)

    def fsync_dir(self, path: str) -> None:
        if not self.fsync:
            return
        with _os_errors(path):
            fd = _open(path, _O_DIR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete ``path`` (a link: the link only); through a link: :class:`UnsafeCheckpointError`."""
        with _os_errors(path):
            parent, name = _split(path)
            try:
                dfd = _open(parent, _O_DIR)
            except (FileNotFoundError, NotADirectoryError) as exc:
                unsafe = _diagnose(path)
                if unsafe is not None:
                    raise unsafe from exc
                return  # nothing there
            try:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if not stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dfd)
                elif recursive:
                    # entries may vanish concurrently (retention and leftover cleanup both delete)
                    _rmtree(name, dfd, os.path.join(parent, name))
                else:
                    os.rmdir(name, dir_fd=dfd)
            finally:
                os.close(dfd)

    # -- reads ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        fd, _ = _open_regular(path)
        with os.fdopen(fd, "rb") as f:
            yield f

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read at most ``length`` bytes at ``offset``, and never more than the file's size."""
        fd, st = _open_regular(path)
        try:
            avail = max(0, st.st_size - offset)
            n = avail if length is None else min(length, avail)
            data = os.pread(fd, n, offset) if n else b""
            if len(data) == n or not data:
                return data
            buf = bytearray(data)
            while len(buf) < n:
                more = os.pread(fd, n - len(buf), offset + len(buf))
                if not more:
                    break
                buf += more
            return bytes(buf)
        except OSError as exc:
            raise _error(exc, path) from exc
        finally:
            os.close(fd)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        fd, _ = _open_regular(path)
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
        except OSError as exc:
            raise _error(exc, path) from exc
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        """Whether an entry is at ``path`` (a link counts); ``False`` when reached through a link."""
        try:
            _lstat(path)
        except (OSError, StorageError):
            return False
        return True

    def size(self, path: str) -> int:
        """The size of the regular file ``path`` (from ``lstat``; nothing is read)."""
        try:
            st = _lstat(path)
        except OSError as exc:
            raise _error(exc, path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, f"is {_kind(st.st_mode)}")
        return st.st_size

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path`` (links included); ``[]`` if missing, a link or through one."""
        try:
            fd = _open(path, _O_DIR)
        except PermissionError as exc:
            raise StorageAuthError(f"{path}: permission denied") from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno in _SUSPECT:
                return []
            raise StorageError(f"{path}: {exc.strerror or exc}") from exc
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def walk_files(self, path: str) -> Iterator[str]:
        """Relative paths of every non-directory under ``path``; linked directories are not entered."""
        try:
            fd = _open(path, _O_DIR)
        except OSError:
            return
        found: list[str] = []
        with _os_errors(path):
            _walk_fd(fd, "", found)
        yield from found

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(_lstat(path).st_mode)
        except (OSError, StorageError):
            return False

    def local_path(self, path: str) -> str | None:
        return path

    def url(self, path: str) -> str:
        return path


def _walk_fd(fd: int, prefix: str, found: list[str]) -> None:
    """Collect the files under the open directory ``fd`` (closed here), never following links."""
    try:
        with os.scandir(fd) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        for name, is_dir in entries:
            if not is_dir:
                found.append(prefix + name)
                continue
            try:
                sub = os.open(name, _O_DIR | _O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed, or replaced by something else, meanwhile
            _walk_fd(sub, f"{prefix}{name}/", found)
    finally:
        os.close(fd)
