"""The commit protocol: how a checkpoint (or any directory ckptio publishes) becomes visible.

It is safe with several writers and removers on one root, which happens on clusters when a job
restarts while processes of the old one are still alive. The rules (docs/commit-protocol.md):

1. **Unique staging.** Each save writes into its own location, named with a random token:
   ``.<name>.<token>.ckptio-partial`` beside the target on ``rename`` stores. Nothing else ever
   has that name, so no writer can empty or recreate another's files. On ``marker`` stores
   (object stores, written in place) the token is in every data file's name instead
   (:func:`tag_file_name`), and a commit sweeps only files no live save owns.
2. **Leases.** Beside each staging location lies ``.<name>.<token>.ckptio-lease``: host, boot id,
   pid and a heartbeat refreshed every :data:`HEARTBEAT_S` seconds while the save runs. Another
   process removes a staging location only when its lease is dead: the owner's process is gone
   (same host), or its heartbeat is older than :data:`LEASE_TIMEOUT_S` (other hosts).
3. **Commit only what this save wrote.** Before the manifest is written, every file the save
   produced is checked to be there with its size. On ``rename`` stores the staging directory is
   renamed into place; a target that appeared meanwhile is never merged into (``rename(2)``
   refuses a non-empty directory), so of two writers one wins whole and the other gets
   :class:`~ckptio.errors.ConcurrentWriteError`. On ``marker`` stores (object stores) the
   manifest is created with the store's conditional put when replacing is not allowed.
4. **Roll forward or back on the next touch.** Replacing a committed checkpoint moves it aside
   to ``.<name>.<token>.ckptio-old`` first. A crash between the two renames leaves no target; the
   next save or load of that URL (any URL, not only a manager's steps) renames the complete new
   copy in when it has its manifest, or the old one back otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, read_limited
from .errors import CheckpointError, CheckpointNotFoundError, ConcurrentWriteError, CorruptCheckpointError
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES

log = logging.getLogger("ckptio.commit")

PARTIAL_SUFFIX = ".ckptio-partial"
OLD_SUFFIX = ".ckptio-old"
LEASE_SUFFIX = ".ckptio-lease"
#: Seconds between two heartbeats of a live lease.
HEARTBEAT_S = 10.0
#: A lease from another host whose heartbeat is older than this is dead. Generous on purpose:
#: a stalled file system or a paused process must not lose its staging directory.
LEASE_TIMEOUT_S = 300.0
_MAX_LEASE_BYTES = 4096
_LEFTOVER_RE = re.compile(
    r"^\.(?P<name>.+?)(?:\.(?P<token>[0-9a-f]{12}))?(?P<kind>\.ckptio-partial|\.ckptio-old|\.ckptio-lease)$"
)


def new_token() -> str:
    """A random 12-hex-digit token naming one save's staging entries (or one lock holder)."""
    return uuid.uuid4().hex[:12]


_TAGGED_RE = re.compile(r"^.+\.(?P<token>[0-9a-f]{12})\.[A-Za-z0-9]+$")


def tag_file_name(name: str, token: str) -> str:
    """``name`` with a save's token before its extension (``__0_0.bin`` -> ``__0_0.<token>.bin``).

    On ``marker`` stores every save writes its data files in place; the token keeps two saves of
    one step from writing the same object, so each manifest describes only bytes its own save
    wrote, and the commit can tell its files from another save's (:meth:`Target.commit`).
    """
    if not token:
        return name
    head, dot, ext = name.rpartition(".")
    return f"{head}.{token}.{ext}" if dot and "/" not in ext else f"{name}.{token}.data"


def file_token(name: str) -> str | None:
    """The save token in a data file's name (see :func:`tag_file_name`), ``None`` when untagged."""
    m = _TAGGED_RE.match(name.rsplit("/", 1)[-1])
    return m.group("token") if m else None


def leftover_name(name: str, token: str, suffix: str) -> str:
    """``.<name>.<token><suffix>``: a staging, moved-aside or lease entry of target ``name``."""
    return f".{name}.{token}{suffix}"


def parse_leftover(entry: str) -> tuple[str, str | None, str] | None:
    """``(target name, token, suffix)`` of a protocol entry, ``None`` for anything else.

    Entries from ckptio 0.1 have no token (``.step_5.ckptio-partial``); they have no owner that
    could still be alive and are treated as dead.
    """
    m = _LEFTOVER_RE.match(entry)
    if m is None:
        return None
    return m.group("name"), m.group("token"), m.group("kind")


def split_parent(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a backend path."""
    stripped = path.rstrip("/")
    if "/" not in stripped:
        return "", stripped
    parent, name = stripped.rsplit("/", 1)
    return parent or "/", name


def _sibling(backend: Backend, parent: str, entry: str) -> str:
    return backend.join(parent, entry) if parent else entry


# -- process identity and leases ---------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (so a recycled pid is not mistaken for the owner)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity() -> dict[str, Any]:
    """Who this process is, as written into leases and the run lock."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "pid_start": _start_time(pid)}


def holder_alive(info: dict[str, Any], timeout: float = LEASE_TIMEOUT_S) -> bool:
    """Whether the process described by a lease or lock is still alive.

    On the same host (same boot) the process table answers at once, so a SIGKILLed writer's
    leftovers are reclaimed by the next touch. Elsewhere only the heartbeat's age can tell.
    """
    me = identity()
    pid = info.get("pid")
    if info.get("host") == me["host"] and info.get("boot_id") == me["boot_id"] and isinstance(pid, int):
        if pid == me["pid"]:
            return True
        start = _start_time(pid)
        return start is not None and (info.get("pid_start") in (None, start))
    beat = info.get("heartbeat")
    return isinstance(beat, (int, float)) and time.time() - float(beat) < timeout


def read_holder(backend: Backend, path: str) -> dict[str, Any] | None:
    """The JSON body of a lease or lock file; ``None`` when missing or unreadable."""
    try:
        body = json.loads(read_limited(backend, path, _MAX_LEASE_BYTES, "lease"))
    except (CheckpointNotFoundError, FileNotFoundError):
        return None
    except (CheckpointError, ValueError, UnicodeDecodeError):
        return {}  # damaged: no owner can be proven alive
    return body if isinstance(body, dict) else {}


class Heartbeat:
    """A file holding this process's identity, rewritten every ``interval`` seconds by a thread.

    Used for staging leases and for the run lock. Started with ``verify=True`` (the run lock),
    the thread first checks that the file still holds this token; when another process took it
    over, it stops and sets :attr:`lost` to the new holder.
    """

    def __init__(
        self, backend: Backend, path: str, token: str | None = None, interval: float = HEARTBEAT_S
    ) -> None:
        self.backend = backend
        self.path = path
        self.token = token or new_token()
        self.body = {**identity(), "token": self.token, "started": time.time()}
        self.interval = interval
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self) -> bytes:
        return json.dumps({**self.body, "heartbeat": time.time()}, sort_keys=True).encode()

    def write(self) -> None:
        self.backend.write_bytes(self.path, self.payload())

    def create(self) -> bool:
        return self.backend.create_bytes(self.path, self.payload())

    def is_ours(self) -> bool:
        body = read_holder(self.backend, self.path)
        return bool(body) and body.get("token") == self.token  # type: ignore[union-attr]

    def start(self, verify: bool = False) -> None:
        self._verify = verify
        self._thread = threading.Thread(target=self._run, name="ckptio-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._verify and not self.is_ours():
                    self.lost = read_holder(self.backend, self.path) or {}
                    return
                self.write()
            except Exception as exc:  # a missed beat is survivable; the timeout is generous
                log.warning("heartbeat of %s failed: %s", self.backend.url(self.path), exc)

    def stop(self, remove: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if remove:
            try:
                self.backend.remove(self.path)
            except Exception as exc:  # an orphaned lease only delays someone's cleanup
                log.warning("could not remove %s: %s", self.backend.url(self.path), exc)


# -- recovery ------------------------------------------------------------------------------------
#: Files whose presence makes a staged or moved-aside directory whole, each written last by its
#: writer: a checkpoint's manifest, or the index of a Hugging Face export (``consolidate``).
COMPLETE_MARKERS = (MANIFEST_NAME, "model.safetensors.index.json")


def _has_manifest(backend: Backend, path: str) -> bool:
    try:
        return backend.exists(backend.join(path, MANIFEST_NAME))
    except CheckpointError:
        return False


def _is_complete(backend: Backend, path: str) -> bool:
    try:
        return any(backend.exists(backend.join(path, marker)) for marker in COMPLETE_MARKERS)
    except CheckpointError:
        return False


Groups = dict[str | None, dict[str, str]]  # token -> {suffix: entry}
TEMP_KEY = "tmp:"  # group key prefix of a lease's interrupted temporary files
_TEMP_OF_RE = re.compile(r"^\.(?P<of>\..+)\.[0-9a-f]{8,32}\.tmp$")


def _groups(backend: Backend, parent: str, name: str) -> Groups:
    """The staging, moved-aside and lease entries of target ``name``, by save token."""
    groups: Groups = {}
    for entry in backend.listdir(parent):
        parsed = parse_leftover(entry)
        if parsed is not None and parsed[0] == name:
            groups.setdefault(parsed[1], {})[parsed[2]] = entry
            continue
        # a temporary file of a lease rewrite that a kill interrupted (``..<lease>.<hex>.tmp``)
        temp = _TEMP_OF_RE.match(entry)
        parsed = parse_leftover(temp.group("of")) if temp else None
        if parsed is not None and parsed[0] == name:
            groups.setdefault(parsed[1], {})[TEMP_KEY + entry] = entry
    return groups


def _split_live(backend: Backend, parent: str, groups: Groups) -> tuple[Groups, dict[str, dict[str, Any]]]:
    """``(dead groups, {token: lease body} of the live ones)``."""
    dead: Groups = {}
    live: dict[str, dict[str, Any]] = {}
    for token, entries in groups.items():
        if all(key.startswith(TEMP_KEY) for key in entries):
            continue  # a save writing its first lease right now (or one killed then): not ours
        lease = entries.get(LEASE_SUFFIX)
        body = read_holder(backend, _sibling(backend, parent, lease)) if lease else None
        if token is not None and body and holder_alive(body):
            live[token] = body
        else:
            dead[token] = entries
    return dead, live


def _remove_dead(backend: Backend, parent: str, dead: Groups, *, keep_moved_aside: bool, quiet: bool) -> None:
    """Remove dead entries, each lease last. ``quiet``: failures are logged, not raised."""
    for entries in dead.values():
        temps = [key for key in entries if key.startswith(TEMP_KEY)]
        for suffix in (*temps, PARTIAL_SUFFIX, OLD_SUFFIX, LEASE_SUFFIX):
            leftover = entries.get(suffix)
            if leftover is None or (suffix == OLD_SUFFIX and keep_moved_aside):
                continue
            try:
                backend.remove(_sibling(backend, parent, leftover), recursive=True)
                log.info("removed %s, left by an interrupted save", leftover)
            except CheckpointError as exc:
                if not quiet:
                    raise
                log.warning("could not remove leftover %s: %s", leftover, exc)


def recover(backend: Backend, final: str) -> None:
    """Finish or undo interrupted replacements of ``final``, and drop its dead leftovers.

    Only entries whose lease is dead are touched, so a save still running elsewhere keeps its
    staging directory.
    """
    if backend.commit_mode != "rename":
        return
    parent, name = split_parent(final)
    groups = _groups(backend, parent, name)
    if not groups:
        return
    dead, _ = _split_live(backend, parent, groups)
    if not dead:
        return
    if not backend.exists(final):
        # roll forward to a complete new copy, else back to the copy that was moved aside
        for suffix in (PARTIAL_SUFFIX, OLD_SUFFIX):
            for entries in dead.values():
                src = entries.get(suffix)
                if src and _is_complete(backend, _sibling(backend, parent, src)):
                    try:
                        backend.rename(_sibling(backend, parent, src), final)
                        backend.fsync_dir(parent or "/")
                        log.warning("recovered %s from %s (an interrupted replacement)", final, src)
                        del entries[suffix]
                    except CheckpointError as exc:
                        log.warning("could not recover %s from %s: %s", final, src, exc)
                    break
            else:
                continue
            break
    # a moved-aside committed copy is the only copy while nothing is at ``final``
    _remove_dead(backend, parent, dead, keep_moved_aside=not backend.exists(final), quiet=True)


def remove_leftovers(backend: Backend, final: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """For deleting ``final`` (``ckptio rm``): remove every dead staging, moved-aside and lease
    entry of it. Returns how many saves' leftovers were removed, and the lease bodies (host,
    pid...) of live saves, by token, whose entries were left alone."""
    parent, name = split_parent(final)
    dead, live = _split_live(backend, parent, _groups(backend, parent, name))
    _remove_dead(backend, parent, dead, keep_moved_aside=False, quiet=False)
    return len(dead), live


# -- one publication -----------------------------------------------------------------------------
def check_replaceable(
    backend: Backend,
    final: str,
    *,
    overwrite: bool,
    what: str,
    hint: str = "pass overwrite=True to replace it",
    replace_foreign: bool = False,
) -> None:
    """Refuse what a publication at ``final`` must not replace (:meth:`Target.prepare` runs it;
    ``ckptio cp --full`` too, before it reads a whole source).

    A committed checkpoint is replaced only with ``overwrite``. A non-empty location without a
    manifest (a run root, another tool's output) only with ``replace_foreign``, whatever
    ``overwrite`` says, because it may be a whole run. A file is never replaced.
    """
    if not backend.exists(final):
        return
    if backend.commit_mode == "rename" and not backend.is_dir(final):
        raise CheckpointError(f"{what} is a file, not a checkpoint directory; ckptio will not replace it")
    if _has_manifest(backend, final):
        if not overwrite:
            raise CheckpointError(f"{what} already holds a committed checkpoint ({hint})")
        return
    entries = backend.listdir(final)
    if entries and not replace_foreign:
        shown = ", ".join(sorted(entries)[:4]) + (", ..." if len(entries) > 4 else "")
        raise CheckpointError(
            f"{what} already holds files that are not a ckptio checkpoint (a run root or another "
            f"tool's output: {shown}); ckptio never replaces them, even with overwrite: choose "
            "another location or remove it yourself"
        )


@dataclass
class Target:
    """One publication at ``final``: prepare, write into :attr:`data_dir`, then commit or abort.

    Used by every save, by ``ckptio cp`` and by consolidation. ``replace_foreign`` allows replacing
    a non-empty location that is not a ckptio checkpoint (a Hugging Face directory being
    re-exported); without it, such a location is never replaced, whatever ``overwrite`` says,
    because it may be a whole run.
    """

    backend: Backend
    final: str
    data_dir: str
    overwrite: bool
    what: str
    token: str = ""
    lease: Heartbeat | None = None
    committed: bool = False
    replace_foreign: bool = False
    _parent: str = field(default="", repr=False)
    _name: str = field(default="", repr=False)
    _listed: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def prepare(
        cls,
        backend: Backend,
        final: str,
        *,
        overwrite: bool,
        what: str,
        hint: str = "pass overwrite=True to replace it",
        replace_foreign: bool = False,
    ) -> Target:
        parent, name = split_parent(final)
        recover(backend, final)
        check_replaceable(
            backend, final, overwrite=overwrite, what=what, hint=hint, replace_foreign=replace_foreign
        )
        token = new_token()
        lease = Heartbeat(backend, _sibling(backend, parent, leftover_name(name, token, LEASE_SUFFIX)), token)
        lease.write()
        lease.start()
        # marker stores write in place, into files tagged with the token (tag_file_name)
        marker = backend.commit_mode != "rename"
        data_dir = final if marker else _sibling(backend, parent, leftover_name(name, token, PARTIAL_SUFFIX))
        try:
            if marker and overwrite:
                backend.remove(backend.join(final, MANIFEST_NAME))  # uncommit first
            backend.makedirs(data_dir)
        except BaseException:
            lease.stop()
            raise
        return cls(
            backend,
            final,
            data_dir,
            overwrite,
            what,
            token,
            lease,
            replace_foreign=replace_foreign,
            _parent=parent,
            _name=name,
        )

    def check_files(self, files: dict[str, dict[str, Any]]) -> None:
        """Every file this save listed is in :attr:`data_dir` with its size (nobody removed it)."""
        self._listed = list(files)
        for rel, info in files.items():
            path = self.backend.join(self.data_dir, rel)
            try:
                size = self.backend.size(path)
            except (CheckpointNotFoundError, FileNotFoundError) as exc:
                raise ConcurrentWriteError(
                    f"{self.backend.url(path)} vanished before the commit of {self.what}: another "
                    "process removed this save's files; nothing was published"
                ) from exc
            if size != info.get("size"):
                raise CorruptCheckpointError(
                    f"{self.backend.url(path)} has {size} bytes, the save wrote {info.get('size')}",
                    path=self.backend.url(path),
                )

    def commit(self, manifest: bytes | None) -> None:
        """Write ``manifest.json`` (when given) last, then publish; on failure publish nothing."""
        b = self.backend
        try:
            if b.commit_mode != "rename":
                if manifest is not None:
                    mpath = b.join(self.final, MANIFEST_NAME)
                    if self.overwrite or not b.atomic_create:
                        b.write_bytes(mpath, manifest)
                    elif not b.create_bytes(mpath, manifest):
                        raise ConcurrentWriteError(
                            f"another writer committed {self.what} first; this save was not published"
                        )
                self.committed = True
                if manifest is not None:
                    self._sweep()
                return
            if not b.exists(self.data_dir):
                raise ConcurrentWriteError(
                    f"the staging directory of {self.what} was removed by another process; nothing was published"
                )
            if manifest is not None:
                b.write_bytes(b.join(self.data_dir, MANIFEST_NAME), manifest)
            b.fsync_dir(self.data_dir)
            self._publish()
            self.committed = True
        finally:
            if not self.committed:
                self.abort()
            elif self.lease is not None:
                self.lease.stop()

    def _publish(self) -> None:
        b = self.backend
        parent = self._parent or "/"
        old = _sibling(b, self._parent, leftover_name(self._name, self.token, OLD_SUFFIX))
        for _attempt in range(3):
            try:
                b.rename(self.data_dir, self.final)
                b.fsync_dir(parent)
                return
            except CheckpointError:
                if not b.exists(self.data_dir):
                    raise
                if not b.exists(self.final):
                    if _attempt == 2:
                        raise
                    continue  # it was moved away meanwhile: try again
            # the target exists and is not empty
            if not self.overwrite or not (self.replace_foreign or _has_manifest(b, self.final)):
                raise ConcurrentWriteError(
                    f"another writer published {self.what} first; this save was not published"
                )
            try:
                b.rename(self.final, old)
            except CheckpointError:
                continue  # someone else moved it first: look again
            try:
                b.rename(self.data_dir, self.final)
            except CheckpointError as exc:
                # another writer's copy landed between our two renames: it is whole; ours is dropped
                b.remove(old, recursive=True)
                raise ConcurrentWriteError(
                    f"another writer replaced {self.what} at the same moment; this save was not published"
                ) from exc
            b.fsync_dir(parent)
            b.remove(old, recursive=True)
            return
        raise ConcurrentWriteError(f"{self.what} kept changing under this save; nothing was published")

    def abort(self) -> None:
        """Drop this save's staging location (never anything else)."""
        if self.lease is None:
            return
        b = self.backend
        with contextlib.suppress(Exception):
            if self.data_dir != self.final:
                b.remove(self.data_dir, recursive=True)
            elif self.token:  # marker store: only the files this save tagged
                for rel in list(b.walk_files(self.final)):
                    if file_token(rel) == self.token:
                        b.remove(b.join(self.final, rel))
        self.lease.stop()

    def _sweep(self) -> None:
        """After a ``marker`` commit: remove data files that no longer belong to anything.

        Candidates are files the new manifest does not list: an older checkpoint's data (an
        overwrite), or files of a save that died. Kept: whatever the *current* manifest lists
        (another save may have committed after this one) and the files of every save whose lease
        is alive. The order matters: files are listed first, then leases, then the manifest is
        read again, so a file seen at the first step either has a lease seen at the second or
        belongs to a save that committed before the third.
        """
        b = self.backend
        try:
            files = [rel for rel in b.walk_files(self.final) if rel != MANIFEST_NAME]
            mine = set(self._listed)
            candidates = [rel for rel in files if rel not in mine and parse_leftover(rel) is None]
            if not candidates:
                return
            groups = _groups(b, self._parent, self._name)
            dead, live = _split_live(b, self._parent, groups)
            live.pop(self.token, None)
            data = read_limited(b, b.join(self.final, MANIFEST_NAME), MAX_MANIFEST_BYTES, "manifest")
            current = set(json.loads(data).get("files", {}))
            for rel in candidates:
                if rel not in current and file_token(rel) not in live:
                    b.remove(b.join(self.final, rel))
            dead.pop(self.token, None)
            _remove_dead(b, self._parent, dead, keep_moved_aside=True, quiet=True)
        except Exception as exc:  # leftovers cost space, never correctness
            log.warning("could not sweep old data files of %s: %s", self.what, exc)
