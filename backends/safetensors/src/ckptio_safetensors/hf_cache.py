"""Hugging Face hub cache sources: ``hf-cache://org/name[@revision]`` and snapshot directories.

The hub cache (``huggingface_hub``'s layout) keeps one directory per repository::

    $HF_HUB_CACHE/models--org--name/
        refs/main                       the commit a branch or tag points to (40 hex digits)
        snapshots/<commit>/config.json  -> ../../blobs/<hash>   (relative symlinks)
        snapshots/<commit>/model.safetensors -> ../../blobs/<hash>
        blobs/<hash>                    the bytes, one regular file per distinct file

**Offline only.** ``hf-cache://org/name`` is resolved from the local cache and nothing else:
ckptio never contacts the Hub. The cache is ``storage_options={"cache_dir": ...}``, else
``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub`` (huggingface_hub's order).
``@revision`` is a branch or tag (a file under ``refs/``) or a commit; the default is ``main``.
A repository or revision that is not there is a :class:`~ckptio.CheckpointNotFoundError` that
says where ckptio looked and that it does not download.

**Symlinks.** ckptio's local backend never follows a link below the directory the user named,
and a snapshot's files are all links. :class:`HubSnapshotBackend` follows exactly one kind of
link, for this source only: a file of ``<repo>/snapshots/<rev>/`` (or a subdirectory) that is a
*relative* link to a direct child of the same repository's ``blobs/`` directory, as
``huggingface_hub`` writes them. The blob is then opened through the local backend, which refuses
any link or special file on the way, so a snapshot cannot lead a read outside its own
repository's ``blobs/``. Any other link (absolute, into another repository, to a directory, a link
to a link) is refused with :class:`~ckptio.UnsafeCheckpointError`. The repository directory
itself is resolved like the user's own path (a cache on another disk, reached through a link, is
fine). Loading the snapshot directory by its path (``.../models--org--name/snapshots/<rev>``)
applies the same rule. Nothing is ever written or deleted through this backend.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from ckptio.errors import CheckpointNotFoundError, InvalidURLError, StorageError, UnsafeCheckpointError
from ckptio.ext import URL, Backend, check_options, open_backend

SCHEME = "hf-cache"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_DIR = re.compile(r"^(models|datasets|spaces)--.+")
_MAX_REF_BYTES = 1024


def cache_dir(explicit: str | None = None) -> tuple[str, str]:
    """The hub cache directory and where that choice came from (for messages)."""
    if explicit:
        return os.path.expanduser(explicit), "cache_dir="
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var])), f"${var}"
    if os.environ.get("HF_HOME"):
        return os.path.join(
            os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub"
        ), "$HF_HOME/hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub"), "the default cache"


def parse_repo(spec: str) -> tuple[str, str]:
    """``"org/name@rev"`` -> ``("org/name", "rev")`` (revision ``main`` when not given)."""
    repo, _, rev = spec.strip("/").partition("@")
    rev = rev or "main"
    if not _REPO_ID.match(repo) or "--" in repo:
        raise InvalidURLError(f"{SCHEME}://{spec}: {repo!r} is not a Hugging Face repo id (org/name)")
    if not _REVISION.match(rev) or ".." in rev.split("/"):
        raise InvalidURLError(f"{SCHEME}://{spec}: {rev!r} is not a revision (branch, tag or commit)")
    return repo, rev


def resolve_snapshot(repo_id: str, revision: str = "main", cache: str | None = None) -> tuple[str, str]:
    """``(repository directory, snapshot directory)`` of ``repo_id`` at ``revision`` in the local
    cache, offline. Raises :class:`~ckptio.CheckpointNotFoundError` naming where it looked."""
    root, origin = cache_dir(cache)
    repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    hint = (
        "ckptio resolves repo ids offline, from the local Hugging Face cache only, and never downloads: "
        f"fetch it first (e.g. `hf download {repo_id}`) or point $HF_HUB_CACHE (or storage_options="
        '{"cache_dir": ...}) at the cache that holds it'
    )
    if not os.path.isdir(repo_dir):
        raise CheckpointNotFoundError(
            f"{SCHEME}://{repo_id} is not in the local Hugging Face cache: no {repo_dir} "
            f"(cache {root}, from {origin}). {hint}"
        )
    repo_dir = os.path.realpath(repo_dir)  # the user's cache may live on another disk, through a link
    commit = revision if _COMMIT.match(revision) else None
    ref = os.path.join(repo_dir, "refs", *revision.split("/"))
    if commit is None or not os.path.isdir(os.path.join(repo_dir, "snapshots", commit)):
        try:
            st = os.lstat(ref)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_REF_BYTES:
                raise UnsafeCheckpointError(f"{ref} is not a small regular file", path=ref)
            with open(ref, encoding="ascii", errors="replace") as f:
                commit = f.read(_MAX_REF_BYTES).strip()
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{SCHEME}://{repo_id}@{revision}: revision {revision!r} is not in the local cache "
                f"(no {ref} and no snapshot of that name in {repo_dir}/snapshots). {hint}"
            ) from None
        if not _COMMIT.match(commit):
            raise UnsafeCheckpointError(f"{ref} does not hold a commit hash", path=ref)
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    try:
        st = os.lstat(snapshot)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{SCHEME}://{repo_id}@{revision}: snapshot {commit} is not in the local cache ({snapshot}). {hint}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCheckpointError(f"{snapshot} is not a directory", path=snapshot)
    return repo_dir, snapshot


def snapshot_repo(path: str) -> str | None:
    """The repository directory when ``path`` is (inside) a hub snapshot, ``.../<models--org--name>/
    snapshots/<rev>[/sub]``, with a ``blobs`` directory beside; else ``None``."""
    parts = path.rstrip("/").split("/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and _REPO_DIR.match(parts[i - 1]):
            repo = "/".join(parts[:i]) or "/"
            if os.path.isdir(os.path.join(repo, "blobs")):
                return repo
    return None


class HubSnapshotBackend(Backend):
    """Read-only access to a hub snapshot through ``inner`` (the local backend), following only
    the snapshot-to-blob links described in the module docstring."""

    commit_mode = "rename"
    STORAGE_OPTIONS = ("cache_dir",)

    def __init__(
        self, inner: Backend, repo_dir: str | None = None, *, scheme: str = "file", cache: str | None = None
    ):
        super().__init__(scheme)
        self.inner = inner
        self.repo_dir = repo_dir
        self.cache = cache

    def resolve(self, path: str) -> str:
        if self.scheme != SCHEME:
            return self.inner.resolve(path)
        repo, rev = parse_repo(path)
        self.repo_dir, snapshot = resolve_snapshot(repo, rev, self.cache)
        return snapshot

    def _real(self, path: str) -> str:
        """``path``, or the blob a snapshot link at ``path`` points to (checked)."""
        repo = self.repo_dir
        if repo is None or not path.startswith(repo.rstrip("/") + "/snapshots/"):
            return path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path
        except OSError as exc:  # pragma: no cover - e.g. a component is not a directory
            raise StorageError(f"{path}: {exc}") from exc
        if not stat.S_ISLNK(st.st_mode):
            return path
        target = os.readlink(path)
        blobs = posixpath.join(repo, "blobs")
        real = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if posixpath.isabs(target) or posixpath.dirname(real) != blobs or not posixpath.basename(real):
            raise UnsafeCheckpointError(
                f"{path} links to {target!r}: a hub snapshot's links must point into its own repository's "
                f"blobs/ ({blobs}); refusing to follow it",
                path=path,
            )
        return real

    # -- reads (through the inner backend, on the real file) ----------------------------------
    def open_read(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.inner.open_read(self._real(path))

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read_bytes(self._real(path), offset, length)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        self.inner.read_into(self._real(path), offset, out)

    def size(self, path: str) -> int:
        return self.inner.size(self._real(path))

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def is_dir(self, path: str) -> bool:
        return self.inner.is_dir(path)

    def walk_files(self, path: str) -> Iterator[str]:
        return self.inner.walk_files(path)

    def local_path(self, path: str) -> str | None:
        return self.inner.local_path(self._real(path))

    def url(self, path: str) -> str:
        return self.inner.url(path)

    def close(self) -> None:
        self.inner.close()

    # -- nothing is written -------------------------------------------------------------------
    def _read_only(self, path: str) -> StorageError:
        return StorageError(f"{self.url(path)}: a Hugging Face cache snapshot is read-only for ckptio")

    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        raise self._read_only(path)

    def remove(self, path: str, recursive: bool = False) -> None:
        raise self._read_only(path)

    def makedirs(self, path: str) -> None:
        raise self._read_only(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        raise self._read_only(path)

    def create_bytes(self, path: str, data: bytes) -> bool:
        raise self._read_only(path)

    def rename(self, src: str, dst: str) -> None:
        raise self._read_only(src)


def open_hf_cache(url: URL | None = None, **storage_options: Any) -> HubSnapshotBackend:
    """The ``hf-cache://`` backend factory (registered by ``ckptio-safetensors``)."""
    check_options(
        storage_options, HubSnapshotBackend.STORAGE_OPTIONS, f"the {SCHEME}:// backend (storage_options)"
    )
    _, inner = open_backend(URL(scheme="file", path="/"))
    return HubSnapshotBackend(inner, scheme=SCHEME, cache=storage_options.get("cache_dir"))


def reading_backend(backend: Backend, path: str) -> Backend:
    """The backend to read a foreign directory at ``path`` through: a hub snapshot on the local
    backend is read through :class:`HubSnapshotBackend` (its links into ``blobs/`` are followed),
    anything else through ``backend`` itself."""
    if isinstance(backend, HubSnapshotBackend) or backend.scheme != "file":
        return backend
    repo = snapshot_repo(path)
    return HubSnapshotBackend(backend, repo) if repo is not None else backend


__all__ = [
    "SCHEME",
    "HubSnapshotBackend",
    "cache_dir",
    "open_hf_cache",
    "parse_repo",
    "reading_backend",
    "resolve_snapshot",
    "snapshot_repo",
]
