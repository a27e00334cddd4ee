"""A key-value store backend: every file is one value under its full path.

Values live in an in-process dict (shared by every backend object of the process, keyed by the
first path segment, the "store") or, with ``storage_options={"root": "/some/dir"}``, one file per
key in a directory. Keys have no real directories, like an object store, so the commit mode is
``marker``: the core writes ``manifest.json`` last and a checkpoint without it does not exist.
"""

from __future__ import annotations

import contextlib
import io
import os
import urllib.parse
from collections.abc import Iterator, MutableMapping
from typing import Any, BinaryIO

from ckptio import URL, Backend, CheckpointNotFoundError

_MEMORY: dict[str, bytes] = {}


class _DirStore(MutableMapping[str, bytes]):
    """A mapping whose values are files in ``root`` (keys percent-encoded into file names)."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _file(self, key: str) -> str:
        return os.path.join(self.root, urllib.parse.quote(key, safe=""))

    def __getitem__(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: bytes) -> None:
        tmp = self._file(key) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, self._file(key))  # a value is replaced whole

    def __delitem__(self, key: str) -> None:
        try:
            os.unlink(self._file(key))
        except FileNotFoundError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return (urllib.parse.unquote(n) for n in os.listdir(self.root) if not n.endswith(".tmp"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class KVBackend(Backend):
    """``kv://`` backend over a dict or a directory of values."""

    commit_mode = "marker"

    def __init__(self, url: URL | None = None, *, root: str | None = None, **options: Any) -> None:
        super().__init__("kv", **options)
        self.store: MutableMapping[str, bytes] = _DirStore(root) if root else _MEMORY

    def _get(self, path: str) -> bytes:
        try:
            return self.store[path]
        except KeyError:
            raise CheckpointNotFoundError(f"{self.url(path)}: no such key") from None

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        if isinstance(self.store, _DirStore):  # stream to a temporary file, then replace whole
            final = self.store._file(path)
            tmp = f"{final}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    yield f  # type: ignore[misc]
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        buf = io.BytesIO()
        yield buf  # an error in the body leaves nothing behind
        self.store[path] = buf.getvalue()

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        if isinstance(self.store, _DirStore):  # a real file: reads and seeks cost no copy
            try:
                f = open(self.store._file(path), "rb")
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.url(path)}: no such key") from None
            with f:
                yield f
            return
        yield io.BytesIO(self._get(path))  # shares the stored bytes until written to

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.open_read(path) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def exists(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return path in self.store or any(k.startswith(prefix) for k in self.store)

    def size(self, path: str) -> int:
        if isinstance(self.store, _DirStore):
            try:
                return os.path.getsize(self.store._file(path))
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.url(path)}: no such key") from None
        return len(self._get(path))

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({k[len(prefix) :].split("/", 1)[0] for k in list(self.store) if k.startswith(prefix)})

    def remove(self, path: str, recursive: bool = False) -> None:
        prefix = path.rstrip("/") + "/"
        for key in list(self.store):
            if key == path or (recursive and key.startswith(prefix)):
                self.store.pop(key, None)
