"""Peer copies for :class:`~ckptio.tiered.TieredCheckpointManager` (``peer_replication=True``):
which copies of other nodes' files a node keeps, and the collectives that make and use them.

* After each local commit, every node's files of the step go to the next node (cyclically), which
  commits them under ``<local>/peers/node_<sender>/step_<S>/`` by the commit protocol: staging,
  checksums on receipt, the manifest last (:meth:`PeerCopies._replicate`).
* Local retention drops the peer copies of the steps it drops, and what dead replications left
  (:meth:`PeerCopies._prune_peers`).
* Before a load, a node without a committed local copy of the step gets its files back from its
  peer's copy, and a node that lost the copy it keeps gets it again (:meth:`PeerCopies._restore_from_peers`).

Every outcome is decided on values every rank holds (gathered first), so all ranks take the same
branch and no collective is left waiting; a failed copy is a warning, never a failed save or load.
The bytes travel through :mod:`ckptio.peer`. This is a part of the tiered manager (a mixin): it
uses the manager's node discovery, local tier and process groups, declared below for type checkers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _dist
from . import peer as _peer
from .checkpoint import manifest_digest, read_manifest_bytes
from .commit import Target, parse_leftover, recover, remove_leftovers
from .errors import CheckpointError, ConcurrentWriteError
from .manager import parse_step_dir, step_name
from .manifest import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from .manager import CheckpointManager
    from .tiered import _Domains
    from .url import URL

log = logging.getLogger("ckptio.tiered")

T = TypeVar("T")


class PeerCopies:
    """The peer-replication part of :class:`~ckptio.tiered.TieredCheckpointManager`."""

    if TYPE_CHECKING:  # provided by TieredCheckpointManager
        _local: CheckpointManager
        local_root: URL
        _peer_group: Any
        _domains: _Domains | None

        def _start(self) -> _Domains: ...
        def _local_path(self, step: int) -> str: ...
        def _local_protected(self) -> set[int]: ...
        def _gather_leaders(
            self, fn: Callable[[], T], pg: Any, share: bool
        ) -> tuple[BaseException | None, Any, list[tuple[BaseException | None, Any]]]: ...

    def _peer_path(self, node: int, step: int | None = None) -> str:
        """``<local>/peers/node_N[/step_S]``: the copies this node keeps of ``node``'s files."""
        lb = self._local.backend
        parts = [_peer.PEERS_DIR, _peer.node_dir_name(node)] + ([] if step is None else [step_name(step)])
        return lb.join(self.local_root.path, *parts)

    def _peer_nodes(self) -> list[int]:
        """The nodes this node keeps (or kept) copies for: ``<local>/peers/node_N``, canonical names only."""
        lb = self._local.backend
        base = lb.join(self.local_root.path, _peer.PEERS_DIR)
        if not lb.exists(base):
            return []
        return sorted(n for n in map(_peer.parse_node_dir, lb.listdir(base)) if n is not None)

    def _peer_steps(self) -> dict[int, list[int]]:
        """``{node: [steps]}``: the committed copies of other nodes' files this node keeps."""
        lb = self._local.backend
        out: dict[int, list[int]] = {}
        for node in self._peer_nodes():
            steps = []
            for name in lb.listdir(self._peer_path(node)):
                s = parse_step_dir(name)
                if s is not None and lb.exists(lb.join(self._peer_path(node, s), MANIFEST_NAME)):
                    steps.append(s)
            out[node] = sorted(steps)
        return out

    def _clear_uncommitted(self, final: str, what: str) -> None:
        """A node's leader, before publishing at ``final`` on the local tier or dropping it: remove
        what dead writers of it left (staging, moved-aside copies, leases) and a directory there
        without a manifest (a deletion cut short, a save that died), the rules of
        :func:`ckptio.commit.remove_leftovers`: nothing a live lease owns, never a committed copy.
        Raises :class:`ConcurrentWriteError` (and removes nothing more) when a live writer holds it."""
        lb = self._local.backend
        recover(lb, final)  # a replacement cut short between its renames: roll it forward or back
        _, live = remove_leftovers(lb, final)
        if live:
            holder = next(iter(live.values()))
            raise ConcurrentWriteError(
                f"another process (host {holder.get('host')!r}, pid {holder.get('pid')}) is writing {what}"
            )
        if lb.exists(final) and lb.is_dir(final) and not lb.exists(lb.join(final, MANIFEST_NAME)):
            log.info("removing %s: it was never committed (or its deletion was cut short)", lb.url(final))
            lb.remove(final, recursive=True)

    def _drop_peer_copy(self, final: str) -> None:
        """Remove one peer copy: its manifest first (a deletion cut short leaves no copy that
        looks committed, and the next prune or replication removes the rest)."""
        lb = self._local.backend
        lb.remove(lb.join(final, MANIFEST_NAME))
        lb.remove(final, recursive=True)

    def _prune_peers(self, kept: set[int]) -> None:
        """A node's leader, after local retention: drop the peer copies of the steps this node no
        longer keeps itself (``kept``: what retention kept, not what is still listed, since its
        deletions run in the background) nor protects, and what dead replications left (staging,
        leases, copies without a manifest, whatever their step; a live replication's lease keeps
        its own)."""
        keep = kept | self._local_protected()
        lb = self._local.backend
        for node in self._peer_nodes():
            found: set[int] = set()  # steps with a copy, or leftovers (staging, leases), here
            for entry in lb.listdir(self._peer_path(node)):
                parsed = parse_leftover(entry)
                s = parse_step_dir(parsed[0] if parsed else entry)
                if s is not None:
                    found.add(s)
            for s in sorted(found):
                final = self._peer_path(node, s)
                try:
                    # dead leftovers, and the copy itself when it has no manifest (a cut-short deletion)
                    self._clear_uncommitted(final, lb.url(final))
                    if s not in keep and lb.is_dir(final):  # never a file (not ours to remove)
                        self._drop_peer_copy(final)
                except ConcurrentWriteError as exc:
                    log.info("leaving %s alone: %s", lb.url(final), exc)
                except CheckpointError as exc:
                    log.warning("could not remove the peer copy %s: %s", lb.url(final), exc)

    def _each_leader(self, fn: Callable[[], T], pg: Any) -> tuple[dict[int, T], dict[int, BaseException]]:
        """Run ``fn`` on each node's leading rank (collective); every rank gets every leader's
        result and every leader's failure, by node. Nothing is raised: the caller decides, on
        values every rank holds, so all ranks take the same branch."""
        dom = self._domains
        assert dom is not None
        _, _, parts = self._gather_leaders(fn, pg, share=True)
        leaders = {g[0]: d for d, g in enumerate(dom.groups)}
        results: dict[int, T] = {}
        failed: dict[int, BaseException] = {}
        for r, (e, o) in enumerate(parts):
            if r in leaders:
                if e is not None:
                    failed[leaders[r]] = e
                else:
                    results[leaders[r]] = o
        return results, failed

    def _broadcast_from(self, node: int, obj: Any, pg: Any) -> Any:
        """``obj`` of ``node``'s leading rank, on every rank (collective)."""
        import torch.distributed as dist

        dom = self._domains
        assert dom is not None
        src = dom.groups[node][0]
        if not _dist.active(pg):
            return obj
        box = [obj if dom.rank == src else None]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(pg, src) if pg is not None else src, group=pg
        )
        return box[0]

    def _replicate(
        self, step: int, held: dict[int, dict[str, tuple[int, str]]], manifest_bytes: bytes, pg: Any
    ) -> None:
        """After the local commit of ``step`` (collective): every node sends its files to the next
        node, which commits them under ``<local>/peers/node_<sender>/`` (staging, checksums on
        receipt, manifest last). A failure is a warning: the step stays committed locally. Each
        node's copy stands alone: one that fails (to prepare, to arrive, to commit) leaves the
        others to go on."""
        dom = self._start()
        n = len(dom.groups)
        if n < 2:
            return
        lb = self._local.backend
        src_dir = self._local_path(step)
        transfers: list[_peer.Transfer] = []
        for d in range(n):  # key d: node d's files, kept by its peer
            files = [(name, size, dg) for name, (size, dg) in held.get(d, {}).items()]
            transfers += _peer.plan(files, dom.groups[d], dom.groups[_peer.peer_of(d, n)], src_dir, d)
        source = (dom.index - 1) % n  # whose files this node keeps
        final = self._peer_path(source, step)
        target: Target | None = None

        def prepare() -> str:
            nonlocal target
            what = f"the peer copy {lb.url(final)}"
            self._clear_uncommitted(final, what)
            target = Target.prepare(lb, final, overwrite=True, what=what)
            return target.data_dir

        failures: dict[int, BaseException] = {}
        try:
            dirs, refused = self._each_leader(prepare, pg)
            failures.update({(h - 1) % n: e for h, e in refused.items()})
            transfers = [t for t in transfers if t.key not in failures]  # the same on every rank
            mine = _peer.exchange(
                lb,
                transfers,
                dom.rank,
                {source: dirs[dom.index]} if dom.index in dirs else {},
                self._peer_group,
            )
            for part in _dist.all_gather({k: _dist.portable(e) for k, e in mine.items()}, pg):
                for key, e in part.items():
                    failures.setdefault(key, e)

            def commit() -> None:
                nonlocal target
                staged, target = target, None  # from here on, aborted (or committed) here
                if staged is None:  # its prepare failed
                    return
                if source in failures:
                    staged.abort()
                    return
                listed = {t.name: {"size": t.size} for t in transfers if t.key == source}
                try:
                    staged.check_files(listed)
                except BaseException:
                    staged.abort()
                    raise
                staged.commit(manifest_bytes)  # aborts itself on failure

            _, unsaved = self._each_leader(commit, pg)
            for h, e in unsaved.items():
                failures.setdefault((h - 1) % n, e)
        except Exception as exc:  # a collective failed: no copy of this step is trusted
            failures = {d: exc for d in range(n)}
        finally:
            if target is not None and not target.committed:
                target.abort()
        if failures and dom.rank == 0:
            log.warning(
                "step %d: peer replication failed (the step is committed locally, and drains to "
                "the durable tier as usual): %s",
                step,
                "; ".join(
                    f"node {d} -> node {_peer.peer_of(d, n)}: {e}"
                    for d, e in sorted(failures.items(), key=lambda x: x[0])
                ),
            )

    def _peer_views(self, pg: Any) -> dict[int, set[int]]:
        """``{node: steps its peer keeps a copy of}`` (only copies kept by the node's current peer)."""
        dom = self._start()
        n = len(dom.groups)
        if self._peer_group is None or n < 2:
            return {}
        mine: dict[int, list[int]] | None = None
        err: BaseException | None = None
        if dom.is_leader:
            try:
                mine = self._peer_steps()
            except CheckpointError as exc:  # the copies are a help: the load goes on without them
                log.warning("cannot list the peer copies under %s: %s", self.local_root, exc)
                mine = {}
            except Exception as exc:  # shared below: raised on every rank, never on this one alone
                err = _dist.portable(exc)
        parts = _dist.all_gather((dom.index, err, mine), pg)
        errors = [e for _, e, _ in parts if e is not None]
        if errors:
            raise errors[0]
        out: dict[int, set[int]] = {}
        for holder, _, kept in parts:
            for node, steps in (kept or {}).items():
                if node < n and _peer.peer_of(node, n) == holder:
                    out.setdefault(node, set()).update(steps)
        return out

    def _restore_from_peers(self, step: int, pg: Any) -> None:
        """Before loading ``step`` (collective), with peer replication: a node that has no committed
        local copy of it gets its files back from its peer's copy, and a node that lost the copy it
        keeps for the previous node gets it again from that node (both sent over the process group,
        checked on receipt, committed by the commit protocol). Only digests and file names are
        gathered; one manifest is then broadcast from a node that holds it, and only when something
        is to be restored. Each copy is restored on its own: one that fails (to prepare, to arrive,
        to commit) is a warning, and the ranks concerned then read those files from the durable tier."""
        dom = self._start()
        n = len(dom.groups)
        if self._peer_group is None or n < 2:
            return
        lb = self._local.backend
        source = (dom.index - 1) % n
        own_dir, kept_dir = self._local_path(step), self._peer_path(source, step)
        found: dict[str, bytes] = {}  # this leader's manifests: they stay here unless chosen

        def look() -> tuple[str | None, list[str], str | None, list[str]]:
            own_d: str | None = None
            own_names: list[str] = []
            try:
                own = read_manifest_bytes(lb, own_dir)
                if own is not None:
                    own_names = sorted(x for x in lb.walk_files(own_dir) if x != MANIFEST_NAME)
                    own_d, found["own"] = manifest_digest(own), own
            except CheckpointError:
                own_d = "damaged"
            kept_d: str | None = None
            names: list[str] = []
            try:
                kept = read_manifest_bytes(lb, kept_dir)
                if kept is not None:
                    names = sorted(x for x in lb.walk_files(kept_dir) if x != MANIFEST_NAME)
                    kept_d, found["kept"] = manifest_digest(kept), kept
            except CheckpointError:
                kept_d, names = None, []
            return (own_d, own_names, kept_d, names)

        seen: Any = None
        err: BaseException | None = None
        if dom.is_leader:
            try:
                seen = look()
            except Exception as exc:  # shared below: every rank gives up alike
                err = _dist.portable(exc)
        parts = _dist.all_gather((dom.index, err, seen), pg)
        errors = [e for _, e, _ in parts if e is not None]
        if errors:
            if dom.rank == 0:
                log.warning(
                    "step %d: cannot tell which nodes hold copies of it, not restoring from peers: %s",
                    step,
                    errors[0],
                )
            return
        info: dict[int, tuple[str | None, list[str], str | None, list[str]]] = {
            d: v for d, _, v in parts if v is not None
        }
        digests = {v[0] for v in info.values() if v[0] not in (None, "damaged")} | {
            v[2] for v in info.values() if v[2] is not None
        }
        if len(digests) != 1:
            if len(digests) > 1 and dom.rank == 0:
                log.warning(
                    "step %d: the nodes' copies (local and peer) differ: not restoring it from peers", step
                )
            return
        ref = next(iter(digests))
        # key 2*d: node d's local copy, from its peer's; key 2*h+1: the copy node h keeps, from its source
        lost = [
            d for d in range(n) if info[d][0] in (None, "damaged") and info[_peer.peer_of(d, n)][2] == ref
        ]
        unkept = [h for h in range(n) if info[h][2] is None and info[(h - 1) % n][0] == ref]
        if not lost and not unkept:
            return
        # the manifest, from the first node that holds it, on every rank (only now: it may be large)
        holder = min(d for d, v in info.items() if ref in (v[0], v[2]))
        mine_m = None
        if dom.index == holder and dom.is_leader:
            mine_m = found["own"] if info[holder][0] == ref else found["kept"]
        found.clear()
        manifest: bytes = self._broadcast_from(holder, mine_m, pg)
        transfers: list[_peer.Transfer] = []
        try:  # the same bytes and names everywhere: the same outcome on every rank
            m = Manifest.from_bytes(manifest, f"step {step}")

            def files_of(names: list[str]) -> list[tuple[str, int, str]]:
                return [
                    (x, int(m.files[x]["size"]), str(m.files[x].get("xxh3"))) for x in names if x in m.files
                ]

            for d in lost:
                h = _peer.peer_of(d, n)
                transfers += _peer.plan(
                    files_of(info[h][3]), dom.groups[h], dom.groups[d], self._peer_path(d, step), 2 * d
                )
            for h in unkept:
                d = (h - 1) % n
                transfers += _peer.plan(
                    files_of(info[d][1]), dom.groups[d], dom.groups[h], self._local_path(step), 2 * h + 1
                )
        except Exception as exc:
            if dom.rank == 0:
                log.warning("step %d: not restoring it from peers: %s", step, exc)
            return
        targets: dict[int, Target] = {}

        def keys_of(d: int) -> list[int]:
            """The copies node ``d`` receives."""
            return ([2 * d] if d in lost else []) + ([2 * d + 1] if d in unkept else [])

        def describe(key: int) -> str:
            d = key // 2
            return (
                f"node {d}'s local copy" if key % 2 == 0 else f"the copy node {d} keeps of node {(d - 1) % n}"
            )

        def prepare() -> dict[int, tuple[str | None, BaseException | None]]:
            wanted = {2 * dom.index: own_dir} if dom.index in lost else {}
            if dom.index in unkept:
                wanted[2 * dom.index + 1] = kept_dir
            out: dict[int, tuple[str | None, BaseException | None]] = {}
            for key, final in wanted.items():
                try:
                    with self._local._lock:
                        deleting = final in self._local._deleting
                    if deleting:
                        raise ConcurrentWriteError(f"{lb.url(final)} is being deleted by local retention")
                    self._clear_uncommitted(final, lb.url(final))
                    targets[key] = Target.prepare(lb, final, overwrite=True, what=lb.url(final))
                    out[key] = (targets[key].data_dir, None)
                except Exception as exc:
                    out[key] = (None, _dist.portable(exc))
            return out

        failures: dict[int, BaseException] = {}
        damaged: set[int] = set()
        try:
            prepared, refused = self._each_leader(prepare, pg)
            for d, e in refused.items():
                failures.update({k: e for k in keys_of(d)})
            for res in prepared.values():
                failures.update({k: e for k, (_, e) in res.items() if e is not None})
            transfers = [t for t in transfers if t.key not in failures]  # the same on every rank
            dirs = {k: p for k, (p, _) in prepared.get(dom.index, {}).items() if p is not None}
            mine = _peer.exchange(lb, transfers, dom.rank, dirs, self._peer_group)
            for part in _dist.all_gather({k: _dist.portable(e) for k, e in mine.items()}, pg):
                for key, e in part.items():
                    damaged.add(key)
                    failures.setdefault(key, e)

            def commit() -> dict[int, BaseException]:
                errs: dict[int, BaseException] = {}
                for key in sorted(targets):
                    target = targets.pop(key)  # from here on, aborted (or committed) here
                    if key in failures:
                        target.abort()
                        continue
                    try:
                        try:
                            target.check_files({t.name: {"size": t.size} for t in transfers if t.key == key})
                        except BaseException:
                            target.abort()
                            raise
                        target.commit(manifest)  # aborts itself on failure
                    except Exception as exc:
                        errs[key] = _dist.portable(exc)
                return errs

            committed, unsaved = self._each_leader(commit, pg)
            for errs in committed.values():
                for key, e in errs.items():
                    failures.setdefault(key, e)
            for d, e in unsaved.items():
                failures.update({k: e for k in keys_of(d) if k not in failures})
        except Exception as exc:  # a collective failed: nothing restored is trusted
            failures = {k: exc for d in range(n) for k in keys_of(d)}
        finally:
            for target in targets.values():
                if not target.committed:
                    target.abort()
        if failures and dom.rank == 0:
            log.warning(
                "step %d: restoring from the peer copies failed for %s",
                step,
                "; ".join(f"{describe(k)}: {e}" for k, e in sorted(failures.items(), key=lambda x: x[0])),
            )
        if dom.index in lost:  # said by the ranks concerned
            key = 2 * dom.index
            if key in failures:
                log.warning(
                    "rank %d: %s (%s): reading this node's files from the durable tier",
                    dom.rank,
                    f"the peer copy of step {step} is damaged"
                    if key in damaged
                    else f"this node's files of step {step} could not be restored from its peer's copy",
                    failures[key],
                )
            elif dom.is_leader:
                log.info("step %d: this node's files were restored from its peer's copy", step)
