"""The storage backend interface.

A backend is the small file API a checkpoint needs on one kind of storage. Tensor files are
written and read through it by the formats (so every format works on every backend), and so are
the manifest, the ``latest`` pointer, run state and addon artifacts: a checkpoint on ``s3://`` is
complete on ``s3://``.

How a checkpoint becomes visible is a *declared* capability, :attr:`Backend.commit_mode`, never
guessed from the path:

* ``"rename"``: the store renames directories atomically (POSIX). Data goes to a staging
  directory that is renamed into place.
* ``"marker"``: object stores. Data goes to its final place and ``manifest.json`` is written
  last; a step without it does not exist.

Paths given to a backend are its own: an absolute path for ``file``, ``bucket/key`` for object
stores, ``profile/key`` for MSC. Build them with :meth:`Backend.join`, which refuses ``..``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, BinaryIO, ClassVar, Literal

from .url import URL, join_path

CommitMode = Literal["rename", "marker"]


_READ_PIECE = 4 << 20  # the default read_into copies through buffers of at most this size


class Backend(abc.ABC):
    """Storage for one URL scheme. Subclasses implement the abstract methods.

    Implementations raise ckptio errors: :class:`~ckptio.errors.CheckpointNotFoundError` for a
    missing object, :class:`~ckptio.errors.StorageAuthError` for refused credentials and
    :class:`~ckptio.errors.StorageError` for anything else that failed after retries.
    """

    #: How a checkpoint is committed on this store (see the module docstring).
    commit_mode: ClassVar[CommitMode] = "marker"

    def __init__(self, scheme: str, **options: Any) -> None:
        self.scheme = scheme
        self.options = options

    # -- required -------------------------------------------------------------------------
    @abc.abstractmethod
    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A writable binary stream for ``path``.

        The object appears (complete) only when the context exits without error; when the body
        raises, nothing is left at ``path`` (multipart uploads are aborted). Local backends
        fsync the file on close. Memory use stays bounded whatever the size written.
        """

    @abc.abstractmethod
    def open_read(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A seekable binary stream over ``path``."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file (or, for directories, any object under the prefix) exists."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size of a file in bytes."""

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the direct children of ``path``; ``[]`` when it does not exist."""

    @abc.abstractmethod
    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file, or a whole tree with ``recursive``; a missing path is not an error."""

    # -- with defaults ----------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        """Create a directory and its parents (object stores have nothing to do)."""

    def resolve(self, path: str) -> str:
        """The canonical form of a user-given root ``path``, resolved once when a URL is opened.

        On POSIX this follows the symlinks *the user* put in the path they passed (a run root
        that links to another disk is saved through, never replaced). Everything below the
        resolved path belongs to the checkpoint, and the local backend never follows a symlink
        there. Object stores have no symlinks: the default returns ``path`` unchanged.
        """
        return path

    def create_bytes(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if nothing is there yet; return whether it did.

        Backends override this with the store's atomic primitive (``O_EXCL``/``link(2)`` on POSIX,
        a conditional ``PutObject`` with ``If-None-Match: *`` on S3), so that of two writers
        exactly one wins. This default checks then writes, which is *not* atomic; such backends
        should say so in :attr:`atomic_create`.
        """
        if self.exists(path):
            return False
        self.write_bytes(path, data)
        return True

    #: Whether :meth:`create_bytes` is atomic on this store (two racing creators: one wins).
    atomic_create: ClassVar[bool] = False

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst`` (only backends with ``commit_mode == "rename"``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rename atomically")

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries durable (POSIX); a no-op elsewhere."""

    def local_path(self, path: str) -> str | None:
        """A local file-system path for ``path`` when there is one, for mmap/pread fast paths."""
        return None

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes at ``offset`` (to the end when ``None``); ranged on object stores.

        Callers that read metadata use :func:`read_limited`, which checks the size first.
        """
        with self.open_read(path) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of ``path`` at ``offset``; a short file is an error.

        Backends override this with the fastest path they have (``preadv`` into the destination
        locally, parallel ranged GETs on object stores).
        """
        got = 0
        with self.open_read(path) as f:  # in bounded pieces: never a second copy of the range
            f.seek(offset)
            readinto = getattr(f, "readinto", None)
            while got < len(out):
                want = min(len(out) - got, _READ_PIECE)
                if readinto is not None:
                    n = readinto(out[got : got + want]) or 0
                else:
                    piece = f.read(want)
                    n = len(piece)
                    out[got : got + n] = piece
                if n == 0:
                    break
                got += n
        if got != len(out):
            from .errors import CorruptCheckpointError

            raise CorruptCheckpointError(
                f"{self.url(path)} is truncated: wanted {len(out)} bytes at offset {offset}, got {got}",
                path=self.url(path),
            )

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole small file; readers see either the old or the new content, never a mix."""
        with self.open_write(path) as f:
            f.write(data)

    def join(self, base: str, *parts: str) -> str:
        """Join relative parts to ``base``; ``..`` and absolute parts are refused."""
        return join_path(base, *parts)

    def url(self, path: str) -> str:
        """The user-facing URL of ``path``, for messages (never contains secrets)."""
        return str(URL(scheme=self.scheme, path=path))

    def walk_files(self, path: str) -> Iterator[str]:
        """Relative paths of every file under ``path`` (recursive)."""
        for name in self.listdir(path):
            child = self.join(path, name)
            sub = list(self.walk_files(child)) if self.is_dir(child) else None
            if sub is None:
                yield name
            else:
                for s in sub:
                    yield f"{name}/{s}"

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` has children (directories on POSIX, prefixes on object stores)."""
        return bool(self.listdir(path))

    def close(self) -> None:
        """Release clients and connections."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_limited(backend: Backend, path: str, limit: int, what: str = "file") -> bytes:
    """Read a whole small file (manifest, pointer, index...) that must not exceed ``limit`` bytes.

    The size is checked *before* anything is read, so a sparse multi-GiB file cannot make ckptio
    allocate without bound, and the read itself stops after ``limit + 1`` bytes, so a file that
    grows or lies about its size cannot either. Raises
    :class:`~ckptio.errors.CorruptCheckpointError` when it is too large, and passes the backend's
    not-found error through.
    """
    from .errors import CorruptCheckpointError

    where = backend.url(path)
    size = backend.size(path)
    if size <= limit:
        # one open, at most ``limit + 1`` bytes: a file replaced between the two calls (an atomic
        # rewrite by another process) is read whole as it is now, never a mix
        with backend.open_read(path) as f:
            data = f.read(limit + 1)
        size = len(data)
    if size > limit:
        raise CorruptCheckpointError(
            f"{where}: {what} is {size} bytes, more than the {limit} allowed; refusing to read it",
            path=where,
        )
    return data
