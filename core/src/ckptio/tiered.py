"""``TieredCheckpointManager``: save to a fast local tier, drain to a durable one, restore from the nearest copy.

A run's checkpoints live on two tiers (docs/tiered.md)::

    <local>/step_00000100/     this node's copy: manifest.json and the files this node's ranks wrote
    <local>/latest, .ckptio-lock, ...   as under any CheckpointManager root (one lock per node)
    <root>/step_00000100/      the durable copy: every file, then manifest.json (committed last)
    <root>/latest, .ckptio-lock, ...

* ``save()`` commits the step on the local tier (``async_save``: the training thread only stages
  the state into host memory). Each group of ranks that sees one local directory (a node; found
  with probe files, never assumed) commits its own copy by the commit protocol: its ranks' files,
  then the manifest, renamed into place. The coordinator writes no manifest before every node's
  files are listed with their sizes and checksums, so no node ever commits a half-written step.
* A background drainer copies each committed step to the durable tier, in order, one step at a
  time, by the same protocol: every rank uploads its share of the files its node holds, then the
  coordinator checks them and writes the manifest last. A failed copy is retried with backoff; the
  last failure is raised by the next ``save()``, ``wait()`` or ``close()`` (:class:`DrainError`).
* Retention runs per tier. A step leaves the local tier only once the durable tier holds it
  (unless ``evict_undrained=True``); the step the run resumed from is never removed from either.
* ``load()`` picks, on every rank alike, the newest step committed on the durable tier or on every
  node's local tier. Each rank reads each file from its own node's copy when that copy holds it
  with the manifest's size (and it passes the checksums), else from the durable tier; a damaged
  local file is read again from the durable tier, with a warning.
* ``peer_replication=True`` (opt-in): each node's files of a step are also sent to the next
  node, which commits them under ``<local>/peers/``; a node that lost its copy gets it back from
  there before a load, over the process group, and reads nothing from the durable tier
  (:mod:`ckptio.peer_copies` decides and commits, :mod:`ckptio.peer` moves the bytes;
  docs/tiered.md "Peer replication").

Why a class of its own rather than ``CheckpointManager(root, local=...)``: the semantics differ
(two roots, two retentions, a background copy, results saying where bytes came from), and a
constructor that returned another type would mislead type checkers and ``isinstance``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import xxhash

from . import _dist
from .addons import AddonSet
from .backend import Backend
from .checkpoint import (
    LoadResult,
    SaveResult,
    build_format_options,
    check_call_options,
    check_metadata,
    check_metrics,
    expand_state,
    load_checkpoint,
    manifest_digest,
    read_manifest,
    read_manifest_bytes,
    run_dcp_save,
)
from .commit import Target, new_token, remove_leftovers
from .copying import COPY_CHUNK, check_digest, stream_file
from .errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    OptionError,
)
from .manager import LATEST_NAME, CheckpointManager, foreign_source, load_foreign, parse_step_dir, step_name
from .manifest import MANIFEST_NAME, Manifest
from .options import declared_keywords
from .peer_copies import PeerCopies
from .plugins import get_format
from .reading import Located
from .retention import KeepAll, KeepLatest, RetentionPolicy, StepInfo
from .staging import HostStager
from .url import URL, parse_url

log = logging.getLogger("ckptio.tiered")

T = TypeVar("T")

#: The two tiers, as :meth:`TieredCheckpointManager.step_locations` and ``ckptio ls`` name them.
LOCAL = "local"
DURABLE = "durable"
#: Probe files that tell which ranks share a local directory (removed right after).
PROBE_PREFIX = ".ckptio-probe-"
#: Files uploaded at once by one rank during a drain.
DRAIN_THREADS = 4


class DrainError(AsyncSaveError):
    """A step committed on the local tier could not be copied to the durable tier (after retries).

    The step is still on the local tier. Raised, like a failed background save, by the next
    ``save()``, ``wait()`` or ``close()``; :attr:`step` is the step.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class _Undrainable(CheckpointError):
    """A drain that cannot succeed by trying again (a node lacks the step, a local file is damaged).

    ``evicted``: no node holds the step any more (local retention removed it first)."""

    def __init__(self, message: str, evicted: bool = False) -> None:
        super().__init__(message)
        self.evicted = evicted


class _Unavailable(CheckpointError):
    """Agreed by every rank: this step cannot be restored from what the tiers hold."""

    def __init__(self, error: CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class TieredLoadResult(LoadResult):
    """A :class:`~ckptio.LoadResult`, plus where this rank's bytes came from.

    :ivar tier_bytes: bytes this rank read from each tier: ``{"local": n, "durable": m}``.
    :ivar fallbacks: files of the local copy that were damaged and read from the durable tier.
    """

    tier_bytes: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """``"local"``, ``"durable"``, ``"both"`` (this rank read from both) or ``"none"``."""
        used = [t for t in (LOCAL, DURABLE) if self.tier_bytes.get(t)]
        return "both" if len(used) == 2 else (used[0] if used else "none")


# -- which ranks share a local directory ------------------------------------------------------------
@dataclass(frozen=True)
class _Domains:
    """The groups of ranks (of the manager's process group) that see one local directory, each
    sorted and led by its lowest rank: one per node when the local tier is node-local."""

    groups: tuple[tuple[int, ...], ...]
    rank: int

    @property
    def index(self) -> int:
        return self.index_of(self.rank)

    def index_of(self, rank: int) -> int:
        return next(i for i, g in enumerate(self.groups) if rank in g)

    @property
    def members(self) -> tuple[int, ...]:
        return self.groups[self.index]

    @property
    def leader(self) -> int:
        return self.members[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def _discover_domains(backend: Backend, root: URL, pg: Any) -> _Domains:
    """Every rank writes a probe file into the local root, then lists which probes it sees.

    Ranks that see the same set share a directory. Anything else (rank A sees B's probe but B
    does not see A's) is a file system this design cannot use, and is refused on every rank.
    """
    rank, world = _dist.rank_and_size(pg)
    backend.makedirs(root.path)
    if world == 1:
        return _Domains(((0,),), 0)
    token = _dist.broadcast(new_token(), pg)
    prefix = f"{PROBE_PREFIX}{token}."
    mine = backend.join(root.path, f"{prefix}{rank}")
    err: BaseException | None = None
    try:
        backend.write_bytes(mine, b"")
    except Exception as exc:
        err = _dist.portable(exc)
    errors = [e for e in _dist.all_gather(err, pg) if e is not None]
    if errors:
        raise CheckpointError(f"cannot write to the local tier {root}: {errors[0]}")
    seen = tuple(
        sorted(
            int(n[len(prefix) :])
            for n in backend.listdir(root.path)
            if n.startswith(prefix) and n[len(prefix) :].isdigit()
        )
    )
    views: list[tuple[int, ...]] = _dist.all_gather(seen, pg)  # also: every rank has listed
    try:
        backend.remove(mine)
    except CheckpointError as exc:  # an empty probe file costs nothing
        log.warning("could not remove the probe %s: %s", backend.url(mine), exc)
    bad = [
        r
        for r in range(world)
        if r not in views[r] or any(o >= world or views[o] != views[r] for o in views[r])
    ]
    if bad:
        raise CheckpointError(
            f"the local tier {root} is shared by some ranks in a way ckptio cannot use: rank {bad[0]} sees "
            f"the files of ranks {list(views[bad[0]])}, but they do not all see the same ones. The local "
            "tier must be either one directory every rank sees, or one per node that only that node's "
            "ranks see (a node-local disk)"
        )
    groups = tuple(sorted(set(views), key=lambda g: g[0]))
    return _Domains(groups, rank)


# -- retention per tier -----------------------------------------------------------------------------
class _Guard(RetentionPolicy):
    """The user's policy for one tier, plus the steps the tiered manager must keep there."""

    def __init__(self, inner: RetentionPolicy, protected: Callable[[], set[int]]) -> None:
        self.inner = inner
        self.protected = protected

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return self.inner.keep(steps) | self.protected()

    def __repr__(self) -> str:
        return repr(self.inner)


# -- reading one step from both tiers ------------------------------------------------------------
class _TierReader(Backend):
    """One rank's read-only view of one step: each file from this node's local copy when it holds
    it with the manifest's size (and it was not found damaged), else from the durable tier.

    Paths are the durable tier's. Bytes read are counted per tier (:attr:`tier_bytes`).
    """

    commit_mode = "marker"  # read-only: nothing to recover or roll forward through this view

    def __init__(
        self,
        durable: Backend,
        durable_dir: str,
        local: Backend | None,
        local_dir: str,
        sizes: dict[str, int],
        *,
        durable_has_step: bool,
        excluded: set[str],
        peer_dir: str | None = None,
        own_local: bool = True,
    ) -> None:
        super().__init__(durable.scheme)
        self.durable = durable
        self.durable_dir = durable_dir.rstrip("/")
        self.local = local
        self.local_dir = local_dir
        self.sizes = sizes
        self.durable_has_step = durable_has_step
        self.excluded = excluded
        #: with peer replication: the copy this node keeps of the previous node's files (read
        #: after its own copy, before the durable tier); ``own_local``: its own copy is usable
        self.peer_dir = peer_dir
        self.own_local = own_local
        self.tier_bytes = {LOCAL: 0, DURABLE: 0}
        #: URL of each file this view serves from the local tier -> its name in the step
        self.local_urls: dict[str, str] = {}
        self._routes: dict[str, tuple[Backend, str, str]] = {}
        self._lock = threading.Lock()

    def _rel(self, path: str) -> str | None:
        prefix = self.durable_dir + "/"
        return path[len(prefix) :] if path.startswith(prefix) else None

    def _route(self, path: str) -> tuple[Backend, str, str]:
        with self._lock:
            hit = self._routes.get(path)
        if hit is not None:
            return hit
        route: tuple[Backend, str, str] = (self.durable, path, DURABLE)
        rel = self._rel(path)
        if self.local is not None and rel is not None and rel not in self.excluded:
            lpath = self.local.join(self.local_dir, *rel.split("/"))
            size: int | None = None
            for base in ([self.local_dir] if self.own_local else []) + (
                [self.peer_dir] if self.peer_dir else []
            ):
                lpath = self.local.join(base, *rel.split("/"))
                try:
                    size = self.local.size(lpath)
                    break
                except (CheckpointError, OSError):
                    size = None
            want = self.sizes.get(rel)
            if size is not None and (want is None or size == want):
                route = (self.local, lpath, LOCAL)
                with self._lock:
                    self.local_urls[self.local.url(lpath)] = rel
            elif size is not None:
                log.warning(
                    "%s has %d bytes, the manifest says %s: reading it from the durable tier",
                    self.local.url(lpath),
                    size,
                    want,
                )
        with self._lock:
            self._routes[path] = route
        return route

    def _count(self, tier: str, n: int) -> None:
        with self._lock:
            self.tier_bytes[tier] += n

    def open_read(self, path: str) -> Any:
        b, p, _ = self._route(path)
        return b.open_read(p)

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        b, p, tier = self._route(path)
        data = b.read_bytes(p, offset, length)
        self._count(tier, len(data))
        return data

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        b, p, tier = self._route(path)
        b.read_into(p, offset, out)
        self._count(tier, out.nbytes)

    def size(self, path: str) -> int:
        b, p, tier = self._route(path)
        rel = self._rel(path)
        if tier == DURABLE and not self.durable_has_step and rel in self.sizes:
            # on no tier this rank can reach: reading it fails inside DCP, on every rank at once,
            # rather than here, on one rank, while the others wait in a collective
            return self.sizes[rel]
        return b.size(p)

    def exists(self, path: str) -> bool:
        b, p, _ = self._route(path)
        return b.exists(p)

    def listdir(self, path: str) -> list[str]:
        return self.durable.listdir(path)

    def is_dir(self, path: str) -> bool:
        return self.durable.is_dir(path)

    def local_path(self, path: str) -> str | None:
        return None  # every byte goes through read_into/read_bytes, where it is counted per tier

    def url(self, path: str) -> str:
        b, p, _ = self._route(path)
        return b.url(p)

    def join(self, base: str, *parts: str) -> str:
        return self.durable.join(base, *parts)

    def open_write(self, path: str) -> Any:
        raise CheckpointError("a tiered load view is read-only")

    def remove(self, path: str, recursive: bool = False) -> None:
        raise CheckpointError("a tiered load view is read-only")


# -- helpers -----------------------------------------------------------------------------------------
_SOLO_LOCK = threading.Lock()
_SOLO: dict[tuple[int, int], Any] = {}


def _solo_group() -> Any:
    """A process group of this rank alone (``None`` without ``torch.distributed``).

    The per-tier :class:`~ckptio.CheckpointManager` helpers run their coordinator steps (run
    lock, clean-up) on one rank per node, and their collectives must involve that rank only.
    """
    if not _dist.active():
        return None
    import torch.distributed as dist

    rank = dist.get_rank()
    key = (id(dist.group.WORLD), rank)
    with _SOLO_LOCK:
        group = _SOLO.get(key)
        if group is None:
            group = dist.new_group(ranks=[rank], backend="gloo", use_local_synchronization=True)
            _SOLO[key] = group
    return group


def _file_digest(backend: Backend, path: str) -> tuple[int, str]:
    """``(size, xxh3-64)`` of a whole file, streamed."""
    h = xxhash.xxh3_64()
    n = 0
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    with backend.open_read(path) as f:
        readinto = getattr(f, "readinto", None)
        while True:
            if readinto is not None:
                got = readinto(view) or 0
                chunk: Any = view[:got]
            else:
                chunk = f.read(COPY_CHUNK)
                got = len(chunk)
            if not got:
                break
            h.update(chunk)
            n += got
    return n, h.hexdigest()


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _upload_one(loc: Located, name: str, info: dict[str, Any], dst: Backend, data_dir: str) -> int:
    """Copy one file of a local step into the durable staging location, checking its size and
    its whole-file checksum (recorded when the step was committed locally)."""
    n, digest = stream_file(loc, name, info, dst, data_dir, _NoBar())
    check_digest(loc, name, info, digest)
    return n


# -- the manager ------------------------------------------------------------------------------------
class TieredCheckpointManager(PeerCopies):
    """Checkpoints committed on a fast local tier and drained in the background to a durable one.

    :param root_url: the durable tier (any ckptio URL: ``s3://bucket/run``, a shared path...).
    :param local: the local tier: a POSIX path (``/nvme/run``, ``/dev/shm/run``), per node or
        shared. Each group of ranks that sees one directory commits its own copy there.
    :param retention: which steps the durable tier keeps (default: all).
    :param local_retention: which steps the local tier keeps (default: ``KeepLatest(2)``).
    :param evict_undrained: let local retention delete steps the durable tier does not hold
        yet (default ``False``: a step leaves the local tier only once it is durable).
    :param async_save: ``save()`` returns once the state is copied into host memory.
    :param storage_options: the durable tier's backend options.
    :param local_storage_options: the local tier's (e.g. ``{"fsync": False}`` for ``/dev/shm``).
    :param process_group: the ranks (default: the default group, if initialised).
    :param takeover: take the run locks of both tiers even from a live holder.
    :param drain_attempts: tries per step before a drain is given up (:class:`DrainError`).
    :param drain_backoff: seconds before the second try; doubled each time up to
        ``drain_max_backoff``.
    :param peer_replication: also copy each node's files of every step to the next node's
        local tier (node ``i`` -> node ``(i + 1) % n``, under ``<local>/peers/``) over the
        process group (gloo send/recv), so that a lost node restores from its peer without
        reading the durable tier (docs/tiered.md, "Peer replication"). Default ``False``.
    :param save_options: the format's save options (``thread_count``...).

    ``save()``, ``load()``, ``wait()`` and ``close()`` are collective: every rank calls them.
    """

    def __init__(
        self,
        root_url: str,
        *,
        local: str,
        retention: RetentionPolicy | None = None,
        local_retention: RetentionPolicy | None = None,
        evict_undrained: bool = False,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        local_storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        takeover: bool = False,
        drain_attempts: int = 5,
        drain_backoff: float = 1.0,
        drain_max_backoff: float = 60.0,
        peer_replication: bool = False,
        **save_options: Any,
    ) -> None:
        durable_u, local_u = parse_url(root_url), parse_url(local)
        if durable_u.format and local_u.format and durable_u.format != local_u.format:
            raise OptionError(
                f"the tiers must share one format (steps are copied file by file): {root_url} is "
                f"{durable_u.format}, {local} is {local_u.format}"
            )
        fmt_name = durable_u.format or local_u.format or "native"
        where = f"TieredCheckpointManager ({fmt_name} format)"
        check_call_options(save_options, declared_keywords(TieredCheckpointManager), "save", fmt_name, where)
        if not isinstance(drain_attempts, int) or drain_attempts < 1:
            raise ValueError(f"drain_attempts={drain_attempts!r}: must be an integer >= 1")
        if drain_backoff < 0 or drain_max_backoff < 0:
            raise ValueError("drain_backoff and drain_max_backoff must be >= 0")
        self._fmt = get_format(fmt_name)
        self._fopts = build_format_options(self._fmt, "save", save_options)
        self.process_group = process_group
        self.retention = retention or KeepAll()
        self.local_retention = local_retention or KeepLatest(2)
        self.evict_undrained = evict_undrained
        self.async_save = async_save
        self.drain_attempts = drain_attempts
        self.drain_backoff = drain_backoff
        self.drain_max_backoff = drain_max_backoff
        if not isinstance(peer_replication, bool):
            raise ValueError(f"peer_replication={peer_replication!r}: must be True or False")
        self.peer_replication = peer_replication
        solo = _solo_group()
        self._durable = CheckpointManager(
            str(durable_u.with_format(fmt_name if fmt_name != "native" else None)),
            retention=_Guard(self.retention, self._durable_protected),
            storage_options=storage_options,
            process_group=solo,
            takeover=takeover,
        )
        try:
            self._local = CheckpointManager(
                str(local_u.with_format(fmt_name if fmt_name != "native" else None)),
                retention=_Guard(self.local_retention, self._local_protected),
                storage_options=local_storage_options,
                process_group=solo,
                takeover=takeover,
            )
        except BaseException:
            self._durable.close()
            raise
        if self._local.backend.commit_mode != "rename":
            self._local.close()
            self._durable.close()
            raise OptionError(
                f"the local tier must be a POSIX path (a node-local disk or /dev/shm), not {local}: "
                "each node commits its own copy of a step by renaming it into place"
            )
        #: The durable tier's root URL, and the local tier's (this node's).
        self.root: URL = self._durable.root
        self.local_root: URL = self._local.root
        self._drain_group = process_group
        self._bg_group = process_group
        if _dist.active(process_group):
            import torch.distributed as dist

            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            # background collectives never share a communicator with training, nor with each other
            self._drain_group = dist.new_group(ranks=ranks, backend="gloo")
            if async_save:
                self._bg_group = dist.new_group(ranks=ranks, backend="gloo")
        self._peer_group: Any = None
        if peer_replication and _dist.active(process_group):
            import torch.distributed as dist

            # peer files travel as CPU tensors: gloo, whatever backend training uses
            self._peer_group = dist.new_group(
                ranks=None if process_group is None else dist.get_process_group_ranks(process_group),
                backend="gloo",
            )
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="ckptio-tiered-save") if async_save else None
        )
        self._stager = HostStager() if async_save else None
        self._save_future: Future[SaveResult] | None = None
        self._save_step: int | None = None
        self._domains: _Domains | None = None
        self._writing = False
        self._drain_q: queue.Queue[int | None] = queue.Queue()
        self._drainer: threading.Thread | None = None
        self._drain_errors: dict[int, DrainError] = {}
        self._reported: set[int] = set()
        self._undrained: set[int] = set()  # committed locally, not yet on the durable tier
        self._loading: int | None = None
        self._draining: int | None = None  # the step being copied (its local files are in use)
        self._stopping = False
        self._wake = threading.Event()
        self._agree = True  # False once closing after an error: no collectives then
        self._lock = threading.Lock()
        self._closed = False
        self.resumed_from: int | None = None
        self.last_result: SaveResult | None = None

    # -- where steps are ----------------------------------------------------------------------
    def _local_path(self, step: int) -> str:
        return self._local._step_path(step)

    def _durable_path(self, step: int) -> str:
        return self._durable._step_path(step)

    def url_of(self, step: int, tier: str = DURABLE) -> URL:
        """The URL of ``step`` on one tier (``"durable"`` or ``"local"``: this node's copy)."""
        if tier not in (LOCAL, DURABLE):
            raise ValueError(f"tier={tier!r}: expected {LOCAL!r} or {DURABLE!r}")
        return (self._local if tier == LOCAL else self._durable).url_of(step)

    def step_locations(self) -> dict[int, set[str]]:
        """``{step: {"local", "durable"}}``: where each committed step lives ("local" is this
        node's copy), ascending."""
        out: dict[int, set[str]] = {}
        for tier, mgr in ((LOCAL, self._local), (DURABLE, self._durable)):
            for s in mgr.steps():
                out.setdefault(s, set()).add(tier)
        return dict(sorted(out.items()))

    def steps(self) -> list[int]:
        """Steps committed on at least one tier (this node's local copy or the durable tier)."""
        return list(self.step_locations())

    def latest_step(self) -> int | None:
        """The newest step committed on at least one tier."""
        latest = [s for s in (self._local.latest_step(), self._durable.latest_step()) if s is not None]
        return max(latest) if latest else None

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step`` (from whichever tier holds it)."""
        return (self._local if self._local._is_committed(step) else self._durable).metrics(step)

    # -- protection ----------------------------------------------------------------------------
    def _local_protected(self) -> set[int]:
        with self._lock:
            keep = set() if self.evict_undrained else set(self._undrained)
            keep |= {s for s in (self._loading, self._draining) if s is not None}
        return keep

    def _durable_protected(self) -> set[int]:
        with self._lock:
            return set() if self._loading is None else {self._loading}

    # -- collectives helpers -----------------------------------------------------------------
    def _on_leaders(self, fn: Callable[[], T], pg: Any, share: bool = False) -> T | None:
        """Run ``fn`` on each node's leading rank; every rank gets its own leader's result
        (``share``), and a failure on any leader is raised on every rank."""
        dom = self._domains
        assert dom is not None
        err, out, parts = self._gather_leaders(fn, pg, share)
        if err is not None:
            raise err
        errors = [e for e, _ in parts if e is not None]
        if errors:
            raise errors[0]
        return parts[dom.leader][1] if share else out

    def _gather_leaders(
        self, fn: Callable[[], T], pg: Any, share: bool
    ) -> tuple[BaseException | None, Any, list[tuple[BaseException | None, Any]]]:
        """Run ``fn`` on each node's leading rank (collective): this rank's own error and result,
        and every rank's ``(portable error, result if share)``."""
        dom = self._domains
        assert dom is not None
        out: Any = None
        err: BaseException | None = None
        if dom.is_leader:
            try:
                out = fn()
            except Exception as exc:
                err = exc
        parts = _dist.all_gather((None if err is None else _dist.portable(err), out if share else None), pg)
        return err, out, parts

    def _start(self) -> _Domains:
        """Find which ranks share a local directory (once; collective)."""
        if self._domains is None:
            self._domains = _discover_domains(self._local.backend, self.local_root, self.process_group)
            groups = self._domains.groups
            if len(groups) > 1 and self._domains.rank == 0:
                log.info(
                    "the local tier %s is node-local: %d groups of ranks see different directories (%s). "
                    "Each node commits its own copy of every step (its ranks' files and the manifest); "
                    "only the durable tier %s holds every file of a step",
                    self.local_root,
                    len(groups),
                    "; ".join(",".join(map(str, g)) for g in groups),
                    self.root,
                )
        return self._domains

    def _local_views(self, pg: Any) -> dict[int, set[int]]:
        """``{node: committed local steps}``, as each node's leader lists them."""
        dom = self._start()
        mine = self._local.steps() if dom.is_leader else None
        parts = _dist.all_gather((dom.index, mine), pg)
        return {d: set(steps) for d, steps in parts if steps is not None}

    def _begin_writing(self) -> None:
        """Before the first write (collective): take the run locks, clean leftovers, and queue
        the drains an earlier run left unfinished."""
        if self._writing:
            return
        self._start()
        pg = self.process_group

        def lock_local() -> None:
            self._local._acquire()
            self._local._recover_replaced()
            self._local._cleanup_partials(set())

        self._on_leaders(lock_local, pg)

        def lock_durable() -> list[int]:
            self._durable._acquire()
            self._durable._recover_replaced()
            self._durable._cleanup_partials(set())
            return self._durable.steps()

        durable_steps: list[int] = _dist.on_coordinator(lock_durable, pg, share_result=True) or []
        views = self._local_views(pg)
        everywhere = set.intersection(*views.values()) if views else set()
        top = max(durable_steps, default=-1)
        # older local steps missing from the durable tier were drained and then pruned there
        pending = sorted(s for s in everywhere if s not in durable_steps and s > top)
        with self._lock:
            self._undrained |= set(pending)
        self._drainer = threading.Thread(target=self._drain_loop, name="ckptio-drain", daemon=True)
        self._drainer.start()
        if pending and _dist.rank_and_size(pg)[0] == 0:
            log.info("steps %s are committed locally but not on %s yet: copying them", pending, self.root)
        for s in pending:
            self._drain_q.put(s)
        self._writing = True

    # -- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SaveResult | None:
        """Commit ``state`` as ``step`` on the local tier; a background drain copies it to the
        durable tier. Returns the result (``None`` with ``async_save``).

        Raises a pending failure first: :class:`~ckptio.AsyncSaveError` for a background save,
        :class:`DrainError` for a copy to the durable tier.
        """
        if self._closed:
            raise CheckpointError("this TieredCheckpointManager is closed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: must be a non-negative integer")
        check_metrics(metrics)
        check_metadata(metadata)
        if self._save_future is not None:  # one background save at a time: its buffers are reused
            self._save_future.exception()
        self._raise_pending()
        self._begin_writing()
        self._on_leaders(lambda: self._local._cleanup_partials(set()), self.process_group)
        if not self.async_save:
            result = self._save_local(step, state, metrics, metadata, self.process_group)
            self.last_result = result
            return result
        assert self._stager is not None and self._executor is not None
        rank, _ = _dist.rank_and_size(self.process_group)
        t0 = time.perf_counter()
        staged = self._stager.stage(expand_state(state, rank))
        staging = time.perf_counter() - t0
        self._save_step = step
        self._save_future = self._executor.submit(
            self._save_local, step, staged, metrics, metadata, self._bg_group, staging
        )
        return None

    def _save_local(
        self,
        step: int,
        state: dict[str, Any],
        metrics: dict[str, float] | None,
        metadata: dict[str, Any] | None,
        pg: Any,
        staging: float | None = None,
    ) -> SaveResult:
        """The local commit, per node: prepare, write, list and checksum, manifest, rename."""
        t0 = time.perf_counter()
        rank, world = _dist.rank_and_size(pg)
        dom = self._start()
        backend = self._local.backend
        path = self._local_path(step)
        url = self.local_root.join(step_name(step))
        target: Target | None = None
        with self._lock:  # kept from local retention from the moment it is committed
            self._undrained.add(step)
        committed = False
        try:

            def prepare() -> str:
                nonlocal target
                target = Target.prepare(backend, path, overwrite=True, what=str(url))
                return target.data_dir

            try:
                data_dir: str = self._on_leaders(prepare, pg, share=True)  # type: ignore[assignment]
                t_prep = time.perf_counter()
                writer = self._fmt.storage_writer(
                    backend, data_dir, self._fopts, progress=False if staging is not None else None
                )
                run_dcp_save(expand_state(state, rank), writer, pg, url)
                t_write = time.perf_counter()
                held = self._checksum_node_files(data_dir, pg)

                def build() -> bytes:
                    found = {name: v for files in held.values() for name, v in files.items()}
                    files: dict[str, dict[str, Any]] = {}
                    for name, info in writer.files.items():
                        got = found.get(name)
                        if got is None:
                            raise ConcurrentWriteError(
                                f"{name} of step {step} is on no node's local tier ({self.local_root}): "
                                "another process removed it before the commit; nothing was published"
                            )
                        if got[0] != info.get("size"):
                            raise CorruptCheckpointError(
                                f"{name} of step {step} has {got[0]} bytes, the save wrote {info.get('size')}"
                            )
                        files[name] = {**info, "xxh3": got[1]}
                    return Manifest(
                        format=self._fmt.name,
                        files=files,
                        format_metadata=writer.format_metadata,
                        world_size=world,
                        step=step,
                        metrics=check_metrics(metrics),  # type: ignore[arg-type]
                        metadata=check_metadata(metadata),
                    ).to_bytes()

                manifest_bytes: bytes = _dist.on_coordinator(build, pg, share_result=True)  # type: ignore[assignment]
            except BaseException:
                if target is not None:
                    target.abort()
                raise
            mine = held.get(dom.index, {})

            def commit() -> None:
                assert target is not None
                m = Manifest.from_bytes(manifest_bytes, str(url))
                try:
                    target.check_files({n: i for n, i in m.files.items() if n in mine})
                except BaseException:
                    target.abort()
                    raise
                target.commit(manifest_bytes)
                try:
                    backend.write_bytes(
                        backend.join(self.local_root.path, LATEST_NAME), (step_name(step) + "\n").encode()
                    )
                except CheckpointError as exc:  # only a hint
                    log.warning(
                        "step %d is committed, but %s/latest was not updated: %s", step, self.local_root, exc
                    )

            self._on_leaders(commit, pg)
            committed = True
        finally:
            if not committed:
                with self._lock:
                    self._undrained.discard(step)
        t_commit = time.perf_counter()
        self._drain_q.put(step)
        if self._peer_group is not None:
            self._replicate(step, held, manifest_bytes, pg)
        t_peer = time.perf_counter()
        if dom.is_leader:
            self._retain(self._local, "local")
        total = sum(size for files in held.values() for size, _ in files.values())
        timings = {"prepare": t_prep - t0, "write": t_write - t_prep, "commit": t_commit - t_write}
        if self._peer_group is not None:
            timings["peer replication"] = t_peer - t_commit
        if staging is not None:
            timings = {"staging (blocking)": staging, **timings}
        result = SaveResult(url=str(url), step=step, bytes=total, seconds=t_commit - t0, timings=timings)
        if rank == 0:
            log.info(
                "step %d committed on the local tier %s: %.1f MB in %.2fs%s",
                step,
                self.local_root,
                total / 1e6,
                result.seconds,
                "" if staging is None else f" ({staging:.2f}s blocked staging)",
            )
        self.last_result = result
        return result

    def _checksum_node_files(self, data_dir: str, pg: Any) -> dict[int, dict[str, tuple[int, str]]]:
        """``{node: {file: (size, xxh3-64)}}`` of what each node's staging directory holds; each
        rank checksums its share of its node's files (read back from the page cache)."""
        dom = self._start()
        backend = self._local.backend
        err: BaseException | None = None
        share: dict[str, tuple[int, str]] = {}
        try:
            names = sorted(backend.walk_files(data_dir))
            mine = names[dom.members.index(dom.rank) :: len(dom.members)]
            if mine:
                with ThreadPoolExecutor(
                    min(DRAIN_THREADS, len(mine)), thread_name_prefix="ckptio-sum"
                ) as pool:
                    sums = list(pool.map(lambda n: _file_digest(backend, backend.join(data_dir, n)), mine))
                share = dict(zip(mine, sums))
        except Exception as exc:
            err = _dist.portable(exc)
        parts = _dist.all_gather((err, dom.index, share), pg)
        errors = [e for e, _, _ in parts if e is not None]
        if errors:
            raise errors[0]
        held: dict[int, dict[str, tuple[int, str]]] = {}
        for _, d, files in parts:
            held.setdefault(d, {}).update(files)
        return held

    def _retain(self, mgr: CheckpointManager, tier: str) -> None:
        try:
            kept = mgr._apply_retention()
            if mgr is self._local and self.peer_replication:
                self._prune_peers(kept)
        except Exception as exc:  # retention never stops training
            log.warning("retention on the %s tier %s failed: %s", tier, mgr.root, exc)

    # -- drains ------------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        g = self._drain_group
        while True:
            step = self._drain_q.get()
            try:
                if step is None:
                    return
                with self._lock:
                    stopping = self._stopping
                if _dist.any_failed(stopping, g):
                    continue  # closing without draining: the step stays local; the next run copies it
                self._drain_step(step)
            except BaseException as exc:  # the thread must never die silently
                log.error("drain of step %s stopped: %s", step, exc)
                if step is not None:
                    self._record(step, DrainError(f"step {step} was not copied to {self.root}: {exc}", step))
            finally:
                self._drain_q.task_done()

    def _record(self, step: int, error: DrainError) -> None:
        with self._lock:
            if step not in self._reported:
                self._drain_errors[step] = error

    def _drain_step(self, step: int) -> None:
        with self._lock:
            self._draining = step
        try:
            self._drain_tries(step)
        finally:
            with self._lock:
                self._draining = None

    def _drain_tries(self, step: int) -> None:
        delay = self.drain_backoff
        for attempt in range(1, self.drain_attempts + 1):
            t0 = time.perf_counter()
            try:
                how = self._drain_once(step)
            except _Undrainable as exc:
                with self._lock:  # it will never be durable: local retention may remove it
                    self._undrained.discard(step)
                if exc.evicted and self.evict_undrained:
                    log.info("step %d left the local tier before it was copied (evict_undrained=True)", step)
                    return
                log.error("step %d cannot be copied to the durable tier %s: %s", step, self.root, exc)
                err = DrainError(f"step {step} cannot be copied to the durable tier {self.root}: {exc}", step)
                err.__cause__ = exc
                self._record(step, err)
                return
            except Exception as exc:
                if attempt == self.drain_attempts:
                    err = DrainError(
                        f"step {step} was not copied to the durable tier {self.root} after {attempt} attempts "
                        f"(it is still on the local tier): {exc}",
                        step,
                    )
                    err.__cause__ = exc
                    log.error("%s", err)
                    self._record(step, err)
                    return
                log.warning(
                    "copying step %d to the durable tier %s failed (attempt %d of %d): %s; trying again in %.1fs",
                    step,
                    self.root,
                    attempt,
                    self.drain_attempts,
                    exc,
                    delay,
                )
                self._wake.wait(delay)  # close() cuts the wait short
                delay = min(delay * 2, self.drain_max_backoff)
                with self._lock:
                    stopping = self._stopping
                if _dist.any_failed(stopping, self._drain_group):  # every rank gives up alike
                    log.warning("closing: step %d stays on the local tier only; the next run copies it", step)
                    return
            else:
                with self._lock:
                    self._undrained.discard(step)
                dom = self._domains
                if dom is not None and dom.is_leader:
                    self._retain(self._local, "local")
                if _dist.rank_and_size(self._drain_group)[0] == 0:
                    log.info(
                        "step %d is on the durable tier %s (%s in %.2fs)",
                        step,
                        self.root,
                        how,
                        time.perf_counter() - t0,
                    )
                return

    def _drain_once(self, step: int) -> str:
        """Copy one step to the durable tier: every rank uploads a share of its node's files, then
        the coordinator checks them and commits the manifest last. Raises the same error on every rank."""
        g = self._drain_group
        rank, _ = _dist.rank_and_size(g)
        dom = self._start()
        lb, db = self._local.backend, self._durable.backend
        src, dst = self._local_path(step), self._durable_path(step)
        err: BaseException | None = None
        data: bytes | None = None
        names: list[str] | None = None
        try:
            data = read_manifest_bytes(lb, src)
            if dom.is_leader and data is not None:
                names = sorted(n for n in lb.walk_files(src) if n != MANIFEST_NAME)
        except Exception as exc:
            err = _dist.portable(exc)
        parts = _dist.all_gather((err, dom.index, None if data is None else manifest_digest(data), names), g)
        errors = [e for e, _, _, _ in parts if e is not None]
        if errors:
            raise errors[0]
        digests = {d: dg for _, d, dg, _ in parts}
        lacking = sorted(d for d, dg in digests.items() if dg is None)
        if lacking:
            raise _Undrainable(
                f"it is not committed on the local tier of every node (missing where ranks "
                f"{[r for d in lacking for r in dom.groups[d]]} write)",
                evicted=len(lacking) == len(digests),
            )
        if len(set(digests.values())) > 1:
            raise _Undrainable("the nodes' local copies have different manifests")
        assert data is not None
        m = Manifest.from_bytes(data, str(self.local_root.join(step_name(step))))
        digest = manifest_digest(data)
        held = {d: set(ns) for _, d, _, ns in parts if ns is not None}
        mine = self._assign(m, held, dom).get(rank, [])
        target: Target | None = None
        what = str(self.root.join(step_name(step)))

        def prepare() -> str | None:
            nonlocal target
            try:
                existing = read_manifest_bytes(db, dst)
            except CorruptCheckpointError:
                existing = None  # damaged: replaced below
            if existing is not None and manifest_digest(existing) == digest:
                return None  # copied before (a run stopped after the commit)
            self._clear_durable_leftovers(step)
            target = Target.prepare(db, dst, overwrite=True, what=what)
            return target.data_dir

        data_dir = _dist.on_coordinator(prepare, g, share_result=True)
        if data_dir is None:
            return "already there"
        err = None
        try:
            loc = Located(url=self.local_root.join(step_name(step)), backend=lb, manifest=m, fmt=self._fmt)
            if mine:
                with ThreadPoolExecutor(
                    min(DRAIN_THREADS, len(mine)), thread_name_prefix="ckptio-drain"
                ) as pool:
                    list(pool.map(lambda n: _upload_one(loc, n, m.files[n], db, data_dir), mine))
        except Exception as exc:
            err = _dist.portable(exc)
        errors = [e for e in _dist.all_gather(err, g) if e is not None]
        if errors:
            if target is not None:
                target.abort()
                self._clear_durable_leftovers(step, quiet=True)
            if isinstance(errors[0], CorruptCheckpointError):
                raise _Undrainable(f"its local copy is damaged: {errors[0]}") from errors[0]
            raise errors[0]

        def commit() -> None:
            assert target is not None
            try:
                target.check_files(m.files)
            except BaseException:
                target.abort()
                raise
            target.commit(data)
            steps = self._durable.steps()
            if not steps or step >= steps[-1]:
                try:
                    db.write_bytes(db.join(self.root.path, LATEST_NAME), (step_name(step) + "\n").encode())
                except CheckpointError as exc:
                    log.warning("step %d is durable, but %s/latest was not updated: %s", step, self.root, exc)
            self._retain(self._durable, "durable")

        _dist.on_coordinator(commit, g)
        return f"{m.total_bytes / 1e6:.1f} MB copied"

    @staticmethod
    def _assign(m: Manifest, held: dict[int, set[str]], dom: _Domains) -> dict[int, list[str]]:
        """Which rank uploads which file: the first node holding it, then its ranks by size."""
        by_node: dict[int, list[str]] = {}
        for name in m.files:
            node = next((d for d in sorted(held) if name in held[d]), None)
            if node is None:
                raise _Undrainable(f"{name} is on no node's local tier")
            by_node.setdefault(node, []).append(name)
        out: dict[int, list[str]] = {}
        for node, names in by_node.items():
            members = dom.groups[node]
            loads = [0] * len(members)
            for name in sorted(names, key=lambda n: (-int(m.files[n]["size"]), n)):
                k = loads.index(min(loads))
                loads[k] += int(m.files[name]["size"])
                out.setdefault(members[k], []).append(name)
        return out

    def _clear_durable_leftovers(self, step: int, quiet: bool = False) -> None:
        """Coordinator, under the durable run lock: remove what dead copies of ``step`` left
        (leases, staging, data without a manifest), never a committed copy."""
        db = self._durable.backend
        dst = self._durable_path(step)
        try:
            _, live = remove_leftovers(db, dst)
            if live:
                holder = next(iter(live.values()))
                raise ConcurrentWriteError(
                    f"another process (host {holder.get('host')!r}, pid {holder.get('pid')}) is writing "
                    f"{self.root.join(step_name(step))}"
                )
            if db.exists(dst) and not db.exists(db.join(dst, MANIFEST_NAME)):
                db.remove(dst, recursive=True)
        except CheckpointError as exc:
            if not quiet:
                raise
            log.warning("could not clean up %s: %s", self.root.join(step_name(step)), exc)

    # -- load --------------------------------------------------------------------------------
    def load(
        self,
        state: dict[str, Any],
        step: int | str | None = "latest",
        *,
        strict: bool = True,
        verify: bool = True,
        init_from: str | os.PathLike[str] | None = None,
        source_storage_options: dict[str, Any] | None = None,
        **format_options: Any,
    ) -> LoadResult:
        """Load ``step`` (default: the newest restorable one) into ``state`` in place.

        Every rank loads the same step: the newest committed on the durable tier or on every
        node's local tier. Each rank reads what its node holds locally (checked against the
        manifest's sizes and checksums) and the rest from the durable tier. With ``"latest"``, a
        step that turns out not to be restorable (a local-only step whose copy is damaged) is
        skipped, with a warning, for the next newest.

        As with :meth:`CheckpointManager.load`, ``step`` may also be the path or URL of a
        checkpoint outside the run (a Hugging Face directory, ``hf-cache://org/name``), and
        ``init_from`` is loaded when the run has no restorable step yet; such a load reads the
        source directly (no tier), returns a plain :class:`~ckptio.LoadResult` with ``step=None``
        and takes ``format_options`` (``dtype_policy``...) and ``source_storage_options``. The
        run's own steps take none (with ``init_from``, the options are ``init_from``'s and are
        dropped once the run has a step, so the same call serves every launch); a path
        to one of them (``<root>/step_N`` or ``<local>/step_N``) loads that step as ``step=N`` does.
        """
        if self._closed:
            raise CheckpointError("this TieredCheckpointManager is closed")
        source = foreign_source(step)
        own = None if source is None else self._own_step(source)
        if own is not None:  # the run's own step by its path: a resume, with retention's protection
            step, source = own, None
        where = "TieredCheckpointManager.load"
        named = source if source is not None else (os.fspath(init_from) if init_from is not None else None)
        check_call_options(
            format_options, _TIERED_LOAD_OWN, "load", parse_url(named).format if named else None, where
        )
        self.wait()
        if source is not None:
            return self._load_foreign(state, source, strict, verify, format_options, source_storage_options)
        pg = self.process_group
        self._start()
        views = self._local_views(pg)
        durable: list[int] = _dist.on_coordinator(self._durable_steps, pg, share_result=True) or []
        if self._peer_group is not None:  # a node's steps include those its peer keeps for it
            kept = self._peer_views(pg)
            views = {d: s | kept.get(d, set()) for d, s in views.items()}
        everywhere = set.intersection(*views.values()) if views else set()
        candidates = sorted(set(durable) | everywhere, reverse=True)
        if step in ("latest", None):
            if not candidates and init_from is not None:
                if _dist.rank_and_size(pg)[0] == 0:
                    log.info("no restorable checkpoint of %s yet: loading init_from=%s", self.root, init_from)
                return self._load_foreign(
                    state, init_from, strict, verify, format_options, source_storage_options
                )
            if init_from is not None:  # the options were init_from's: the run's step loads as saved
                format_options = {}
            if not candidates:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint on the local tier {self.local_root} or the durable tier {self.root}"
                    " (to start from a base model when the run has none, pass init_from=)"
                )
            order = candidates
        elif isinstance(step, int) and not isinstance(step, bool):
            if step not in candidates:
                somewhere = sorted(d for d, s in views.items() if step in s)
                if somewhere:
                    raise CheckpointNotFoundError(
                        f"step {step} is on the local tier of some nodes only (ranks "
                        f"{[r for d in somewhere for r in self._start().groups[d]]}) and not on the durable "
                        f"tier {self.root}: it cannot be restored (restorable: {sorted(candidates)})"
                    )
                raise CheckpointNotFoundError(
                    f"no step {step} on {self.local_root} or {self.root} (restorable: {sorted(candidates)})"
                )
            order = [step]
        else:
            raise ValueError(f"step={step!r}: expected an int or 'latest'")
        if format_options:
            raise OptionError(
                f"{where}: {', '.join(sorted(format_options))} "
                f"{'applies' if len(format_options) == 1 else 'apply'} only to a source outside the run "
                "(step=<path or URL>, or init_from= while the run has no step); its own steps load as saved"
            )
        for i, s in enumerate(order):
            with self._lock:
                self._loading = s
            try:
                self._restore_from_peers(s, pg)
                result = self._load_step(state, s, s in durable, strict, verify)
            except _Unavailable as exc:
                if i + 1 == len(order) or step not in ("latest", None):
                    raise exc.error from exc
                if _dist.rank_and_size(pg)[0] == 0:
                    log.warning(
                        "step %d cannot be restored (%s); loading step %d instead", s, exc.error, order[i + 1]
                    )
                continue
            finally:
                with self._lock:
                    self._loading = None
            self.resumed_from = self._local.resumed_from = self._durable.resumed_from = s
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _own_step(self, source: str) -> int | None:
        """The step of this run that ``source`` names: ``<root>/step_N`` on the durable tier or
        ``<local>/step_N`` on the local tier (canonical step names only), else ``None``."""
        u = parse_url(source)

        def real(p: str) -> str:
            return os.path.realpath(p) if u.scheme == "file" else p

        for root in (self.root, self.local_root):
            if u.scheme != root.scheme or u.format not in (None, root.format):
                continue
            parent, _, name = real(u.path).rstrip("/").rpartition("/")
            step = parse_step_dir(name)
            if step is not None and parent == real(root.path).rstrip("/"):
                return step
        return None

    def _load_foreign(
        self,
        state: dict[str, Any],
        source: str | os.PathLike[str],
        strict: bool,
        verify: bool,
        format_options: dict[str, Any],
        source_storage_options: dict[str, Any] | None,
    ) -> LoadResult:
        return load_foreign(
            state,
            source,
            root=self.root,
            storage_options=self._durable.storage_options,
            source_storage_options=source_storage_options,
            process_group=self.process_group,
            addons=AddonSet(),  # the tiered manager runs no addons
            strict=strict,
            verify=verify,
            format_options=format_options,
        )

    def _durable_steps(self) -> list[int]:
        self._durable._recover_replaced()
        return self._durable.steps()

    def _load_step(
        self, state: dict[str, Any], step: int, on_durable: bool, strict: bool, verify: bool
    ) -> TieredLoadResult:
        pg = self.process_group
        rank, _ = _dist.rank_and_size(pg)
        lb, db = self._local.backend, self._durable.backend
        lpath, dpath = self._local_path(step), self._durable_path(step)

        def reference() -> str | None:
            b, p = (db, dpath) if on_durable else (lb, lpath)
            try:
                found = read_manifest_bytes(b, p)
            except CheckpointError:
                return None
            return None if found is None else manifest_digest(found)

        # the manifest every rank loads with: the durable one, else the coordinator's local one
        ref = _dist.on_coordinator(reference, pg, share_result=True)
        if ref is None:
            raise _Unavailable(CheckpointNotFoundError(f"step {step} vanished before it could be loaded"))
        try:
            mine = read_manifest_bytes(lb, lpath)
        except CheckpointError:
            mine = None
        local_ok = mine is not None and manifest_digest(mine) == ref
        if mine is not None and not local_ok:
            log.warning(
                "rank %d: the local copy %s differs from the one being loaded (damaged, or another save of "
                "step %d): reading this step from the durable tier",
                rank,
                self.url_of(step, LOCAL),
                step,
            )
        if not all(_dist.all_gather(local_ok or on_durable, pg)):
            raise _Unavailable(
                CheckpointNotFoundError(
                    f"step {step} is not on the durable tier and some node lacks a usable copy"
                )
            )
        sizes: dict[str, int] = {}
        if local_ok:
            assert mine is not None
            sizes = {
                n: int(i["size"])
                for n, i in Manifest.from_bytes(mine, str(self.url_of(step, LOCAL))).files.items()
            }
        peer_dir: str | None = None
        groups = self._start().groups
        if self._peer_group is not None and len(groups) > 1:  # the copy of the previous node's files
            pdir = self._peer_path((self._start().index - 1) % len(groups), step)
            try:
                kept = read_manifest_bytes(lb, pdir)
            except CheckpointError:
                kept = None
            if kept is not None and manifest_digest(kept) == ref:
                peer_dir = pdir
                if not sizes:
                    sizes = {
                        n: int(i["size"]) for n, i in Manifest.from_bytes(kept, lb.url(pdir)).files.items()
                    }
        excluded: set[str] = set()
        fallbacks: list[str] = []
        for attempt in range(3):
            reader = _TierReader(
                db,
                dpath,
                lb if local_ok or peer_dir else None,
                lpath,
                sizes,
                durable_has_step=on_durable,
                excluded=excluded,
                peer_dir=peer_dir,
                own_local=local_ok,
            )
            try:
                res = load_checkpoint(
                    state,
                    self._durable.url_of(step),
                    backend=reader,
                    strict=strict,
                    verify=verify,
                    process_group=pg,
                    step=step,
                )
            except CheckpointError as err:
                verdict = self._verdict(err, rank, reader, on_durable)
                if verdict[0] == "solo":  # not a collective failure: the other ranks are not here
                    raise
                kinds = [v[0] for v in _dist.all_gather(verdict, pg)]
                if "fatal" in kinds or attempt == 2:
                    raise
                if "gone" in kinds:
                    raise _Unavailable(err) from err
                if verdict[0] == "local":
                    name = verdict[1]
                    log.warning(
                        "rank %d: %s of step %d on the local tier is damaged (%s); reading it from the durable tier %s",
                        rank,
                        name,
                        step,
                        verdict[2],
                        self.root,
                    )
                    if attempt >= 1:
                        local_ok = False  # damaged twice: this rank reads everything from the durable tier
                    excluded.add(str(name))
                    fallbacks.append(str(name))
                continue
            result = TieredLoadResult(
                **{f.name: getattr(res, f.name) for f in fields(LoadResult)},
                tier_bytes=dict(reader.tier_bytes),
                fallbacks=fallbacks,
            )
            log.info(
                "rank %d restored step %d: %d bytes from the local tier, %d from the durable tier",
                rank,
                step,
                reader.tier_bytes[LOCAL],
                reader.tier_bytes[DURABLE],
            )
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _verdict(
        err: CheckpointError, rank: int, reader: _TierReader, on_durable: bool
    ) -> tuple[str, str | None, str]:
        """What a failed load means for this rank: ``ok`` (it did not fail), ``local`` (a damaged
        local file: read it from the durable tier), ``gone`` (no tier holds what it needs),
        ``fatal``, or ``solo`` (not a failure every rank saw)."""
        failures = getattr(err.__cause__, "failures", None)
        if not isinstance(failures, dict):
            return ("solo", None, str(err))
        inner: Any = failures.get(rank)
        if inner is None:
            return ("ok", None, "")
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, CorruptCheckpointError):
            name = reader.local_urls.get(inner.path or "")
            if name is not None:
                return ("local", name, str(inner)) if on_durable else ("gone", name, str(inner))
            if not on_durable:
                return ("gone", None, str(inner))
        return ("fatal", None, str(inner))

    # -- lifecycle -----------------------------------------------------------------------------
    def _raise_pending(self) -> None:
        """Raise a failed background save, else a failed drain, on every rank alike."""
        fut = self._save_future
        if fut is not None and fut.done():
            self._save_future = None
            exc = fut.exception()
            if exc is not None:
                raise AsyncSaveError(
                    f"background save of step {self._save_step} to the local tier {self.local_root} failed: {exc}"
                ) from exc
        with self._lock:
            failed = sorted(s for s in self._drain_errors if s not in self._reported)
        if self._agree and self._domains is not None:
            failed = sorted(set().union(*_dist.all_gather(failed, self.process_group)))
        if not failed:
            return
        with self._lock:
            self._reported |= set(failed)
            errors = [self._drain_errors.pop(s) for s in failed if s in self._drain_errors]
        for extra in errors[1:]:
            log.error("also: %s", extra)
        raise (
            errors[0]
            if errors
            else DrainError(
                f"step {failed[0]} was not copied to the durable tier {self.root} (see the other ranks' logs)",
                failed[0],
            )
        )

    def wait(self, *, durable: bool = False) -> None:
        """Block until the background save is committed locally (and, with ``durable=True``,
        until every locally committed step is on the durable tier); raise the first failure."""
        if self._save_future is not None:
            self._save_future.exception()
        if durable and not self._closed:
            self._begin_writing()
            self._drain_q.join()
        self._raise_pending()

    def close(self, *, drain: bool = True) -> None:
        """Wait for the background save and (``drain=True``) for every copy to the durable tier,
        stop the threads, release the run locks, and raise any pending failure.

        With ``drain=False`` the steps not yet copied stay on the local tier only; the next
        manager on these roots copies them at its first ``save()`` or ``wait(durable=True)``.
        """
        if self._closed:
            return
        try:
            self.wait(durable=drain and self._writing)
        finally:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._drainer is not None and self._drainer.is_alive():
            self._drain_q.put(None)
            self._drainer.join(timeout=None if self._agree else 0)
        if self._executor is not None:
            self._executor.shutdown(wait=self._agree)
        if self._stager is not None and self._agree:
            self._stager.close()
        for mgr in (self._local, self._durable):
            try:
                mgr.close()
            except Exception as exc:
                log.warning("while closing the tier %s: %s", mgr.root, exc)

    def __enter__(self) -> TieredCheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # do not hide the original error, do not wait for copies (the next run makes them), and
        # do not wait in collectives other ranks may never join
        self._agree = not _dist.active(self.process_group)
        try:
            self.close(drain=False)
        except Exception as bg:
            log.warning("while closing after an error: %s", bg)


# -- the command line's view --------------------------------------------------------------------
def describe_tiers(
    root_url: str,
    local: str,
    *,
    storage_options: dict[str, Any] | None = None,
    local_storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every step of a tiered run and where it lives (``ckptio ls ROOT --local PATH``).

    Returns ``{"kind": "tiers", "url", "local", "latest", "steps": [...]}``; each step has
    ``step``, ``tiers`` (the tiers where it is committed), ``tier`` (``"local"``, ``"durable"``,
    ``"both"`` or ``"-"``), ``committed``, ``latest``, ``url`` and, when committed, its manifest's
    summary (``format``, ``bytes``, ``files``, ``metrics``, ``created`` (seconds since the epoch),
    ``world_size``).
    """
    durable = CheckpointManager(root_url, storage_options=storage_options)
    try:
        local_mgr = CheckpointManager(local, storage_options=local_storage_options)
    except BaseException:
        durable.close()
        raise
    try:
        seen = {LOCAL: local_mgr.all_steps(), DURABLE: durable.all_steps()}
        committed = {s for tier in seen.values() for s, ok in tier.items() if ok}
        latest = max(committed, default=None)
        entries = []
        for s in sorted(set(seen[LOCAL]) | set(seen[DURABLE])):
            tiers = [t for t in (LOCAL, DURABLE) if seen[t].get(s)]
            home = DURABLE if DURABLE in tiers or (not tiers and s in seen[DURABLE]) else LOCAL
            mgr = durable if home == DURABLE else local_mgr
            entry: dict[str, Any] = {
                "step": s,
                "tiers": tiers,
                "tier": "both" if len(tiers) == 2 else (tiers[0] if tiers else "-"),
                "committed": bool(tiers),
                "latest": s == latest,
                "url": str(mgr.url_of(s)),
            }
            if tiers:
                m = read_manifest(mgr.backend, mgr._step_path(s))
                if m is not None:
                    entry.update(
                        format=m.format,
                        bytes=m.total_bytes,
                        files=len(m.files),
                        metrics=dict(m.metrics),
                        created=m.created,
                        world_size=m.world_size,
                    )
            entries.append(entry)
        return {
            "kind": "tiers",
            "url": str(durable.root),
            "local": str(local_mgr.root),
            "latest": latest,
            "steps": entries,
        }
    finally:
        local_mgr.close()
        durable.close()


# the keywords load() itself declares: never taken for format options
_TIERED_LOAD_OWN = declared_keywords(TieredCheckpointManager.load)
