"""``CheckpointManager``: a series of checkpoints under one root URL.

Layout (every file goes through the root's backend, so the series is complete on any store)::

    <root>/latest              name of the newest committed step (a hint; verified on use)
    <root>/step_00000100/      one checkpoint (see ckptio.checkpoint for the commit protocol)

Only committed steps exist for ``steps()``, ``latest_step()``, ``load()`` and retention. The next
save removes what interrupted saves left behind. With ``async_save=True``, ``save()`` returns once
the state is copied to host buffers (reused across saves); writing, committing, ``after_commit``
addons and retention run in the background, and a background failure is raised by the next
``save()``, ``wait()`` or ``close()``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import _dist
from .addons import AddonLike, AddonSet
from .checkpoint import (
    LoadResult,
    SaveResult,
    check_call_options,
    check_metrics,
    decode_metrics,
    load_checkpoint,
    open_backend,
    read_manifest,
    save_checkpoint,
)
from .commit import OLD_SUFFIX, Heartbeat, holder_alive, parse_leftover, read_holder, recover
from .errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    OptionError,
    RunLockedError,
)
from .manifest import MANIFEST_NAME
from .options import declared_keywords
from .retention import KeepAll, RetentionPolicy, StepInfo
from .staging import HostStager
from .url import URL, parse_url

log = logging.getLogger("ckptio.manager")

LATEST_NAME = "latest"
LOCK_NAME = ".ckptio-lock"
_STEP_RE = re.compile(r"^step_(\d{1,18})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


_CANONICAL_STEP_RE = re.compile(r"^step_([0-9]{1,18})$")


def parse_step_dir(name: str) -> int | None:
    """The step a directory name stands for, for a canonical :func:`step_name` only
    (``step_3``, ``step_²`` or ``step_000000003`` stand for none)."""
    m = _CANONICAL_STEP_RE.match(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_name(step) == name else None


@dataclass
class StepDeletion:
    """What :meth:`CheckpointManager.delete` did to one step.

    :ivar committed: the step was a committed checkpoint.
    :ivar removed: something of it was removed (its directory, or leftovers of interrupted saves).
    :ivar busy: saves of this step still running (a live lease, here or on another host), by
        save token: their lease bodies (``host``, ``pid``...). Their files were left alone.
    """

    step: int
    committed: bool = False
    removed: bool = False
    busy: dict[str, dict[str, Any]] = field(default_factory=dict)


class CheckpointManager:
    """Save, find, load and prune the checkpoints of one run.

    :param root_url: where the series lives (any URL ckptio understands, format prefix included).
    :param retention: which committed steps to keep (default: all). The newest committed step
        and the step this run resumed from are always kept.
    :param async_save: return from ``save()`` once the state is staged in host memory.
    :param max_in_flight: background saves allowed at once (each has its own staging buffers).
    :param addons: addons active for every save and load of this manager.
    :param storage_options: passed to the backend.
    :param process_group: the ranks taking part (default: the default group, if initialised).
    :param takeover: take the run lock even when another live process holds it. The lock is
        taken on the first ``save()`` or ``delete()``; a second manager writing the same root is
        refused with :class:`~ckptio.RunLockedError` naming the holder (host, pid), because two
        jobs interleaving steps in one run is never what anyone wants. Use ``takeover=True``
        once you know the other job is gone (or must yield): it then stops at its next save.
    :param save_options: the format's save options, passed to every save (``thread_count``...;
        see ``docs/configuration.md``). Any other keyword raises :class:`~ckptio.OptionError`
        here, before the backend is opened.
    """

    def __init__(
        self,
        root_url: str,
        *,
        retention: RetentionPolicy | None = None,
        async_save: bool = False,
        max_in_flight: int = 1,
        addons: Iterable[AddonLike] = (),
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        takeover: bool = False,
        **save_options: Any,
    ) -> None:
        root = parse_url(root_url)
        fmt_name = root.format or "native"
        own = declared_keywords(CheckpointManager)
        if "local" in save_options:  # a run with a local tier has a manager of its own
            raise OptionError(
                "CheckpointManager has no local tier: use ckptio.TieredCheckpointManager(root_url, local=...) "
                "(docs/tiered.md)"
            )
        check_call_options(save_options, own, "save", fmt_name, f"CheckpointManager ({fmt_name} format)")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r}: must be >= 1")
        self.root, self.backend = open_backend(root, storage_options)
        self.storage_options = storage_options  # also for loads from outside the run on the same storage
        self.takeover = takeover
        self._run_lock: Heartbeat | None = None
        self.retention = retention or KeepAll()
        self.async_save = async_save
        self.max_in_flight = max_in_flight
        self.addons = AddonSet(addons)
        self.process_group = process_group
        self.save_options = save_options
        self.resumed_from: int | None = None
        self._in_flight: list[tuple[int, Future[SaveResult]]] = []
        self._stagers = [HostStager() for _ in range(max_in_flight)]
        self._stager_busy: dict[int, Future[SaveResult]] = {}
        self._errors: list[BaseException] = []
        self._executor: ThreadPoolExecutor | None = None
        self._bg_group = process_group
        if async_save:
            self._executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix="ckptio-async")
            if _dist.active(process_group):
                import torch.distributed as dist

                ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
                # background collectives must not share a communicator with training
                self._bg_group = dist.new_group(ranks=ranks, backend="gloo")
        self._deleter: queue.Queue[str | None] = queue.Queue()
        self._deleting: set[str] = set()  # step paths retention is removing right now
        self._deleter_thread: threading.Thread | None = None
        self._metrics_cache: dict[int, dict[str, float]] = {}
        self._closed = False
        self._lock = threading.Lock()
        self.last_result: SaveResult | None = None

    # -- discovery ----------------------------------------------------------------------------
    def _step_path(self, step: int) -> str:
        return self.backend.join(self.root.path, step_name(step))

    def url_of(self, step: int) -> URL:
        """The URL of one step's checkpoint."""
        return self.root.join(step_name(step))

    def _is_committed(self, step: int) -> bool:
        return self.backend.exists(self.backend.join(self._step_path(step), MANIFEST_NAME))

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        out = []
        for name in self.backend.listdir(self.root.path):
            m = _STEP_RE.match(name)
            if m and self._is_committed(int(m.group(1))):
                out.append(int(m.group(1)))
        return sorted(out)

    def all_steps(self) -> dict[int, bool]:
        """Every step directory seen, committed or not (``ckptio ls``)."""
        out: dict[int, bool] = {}
        for name in self.backend.listdir(self.root.path):
            parsed = parse_leftover(name)
            m = _STEP_RE.match(parsed[0] if parsed else name)
            if m:
                step = int(m.group(1))
                out[step] = out.get(step, False) or (name == step_name(step) and self._is_committed(step))
        return dict(sorted(out.items()))

    def latest_step(self) -> int | None:
        """The newest committed step: the ``latest`` pointer when valid, else a scan."""
        try:
            text = (
                self.backend.read_bytes(self.backend.join(self.root.path, LATEST_NAME), 0, 64)
                .decode()
                .strip()
            )
            m = _STEP_RE.match(text)
            if m and self._is_committed(int(m.group(1))):
                pointed = int(m.group(1))
                steps = self.steps()
                return max([pointed, *steps])
            if text:
                log.warning("ignoring invalid %s pointer %r under %s", LATEST_NAME, text[:64], self.root)
        except (CheckpointNotFoundError, FileNotFoundError, UnicodeDecodeError):
            pass
        except CheckpointError as exc:  # a pointer that is a FIFO, a link...: it is only a hint
            log.warning("ignoring the %s pointer under %s: %s", LATEST_NAME, self.root, exc)
        steps = self.steps()
        return steps[-1] if steps else None

    def metrics(self, step: int) -> dict[str, float]:
        if step not in self._metrics_cache:
            m = read_manifest(self.backend, self._step_path(step))
            self._metrics_cache[step] = decode_metrics(m.metrics) if m else {}
        return self._metrics_cache[step]

    # -- save ---------------------------------------------------------------------------------
    def _raise_pending(self) -> None:
        with self._lock:
            done = [(s, f) for s, f in self._in_flight if f.done()]
            self._in_flight = [(s, f) for s, f in self._in_flight if not f.done()]
        for step, fut in done:
            exc = fut.exception()
            if exc is not None:
                raise AsyncSaveError(
                    f"background save of step {step} to {self.url_of(step)} failed: {exc}"
                ) from exc

    # -- the run lock -------------------------------------------------------------------------
    def _lock_path(self) -> str:
        return self.backend.join(self.root.path, LOCK_NAME)

    def _acquire(self) -> None:
        """Hold the run lock (coordinator only): one live writer per series root."""
        if self._run_lock is not None:
            if self._run_lock.lost is not None:
                h = self._run_lock.lost
                raise RunLockedError(
                    f"{self.root} was taken over by another process (host {h.get('host')!r}, pid "
                    f"{h.get('pid')}); this manager stopped writing it",
                    h,
                )
            return

        def acquire() -> None:
            lock = Heartbeat(self.backend, self._lock_path())
            if not lock.create():
                holder = read_holder(self.backend, self._lock_path()) or {}
                alive = bool(holder) and holder_alive(holder)
                if alive and not self.takeover:
                    raise RunLockedError(
                        f"another process (host {holder.get('host')!r}, pid {holder.get('pid')}) is writing "
                        f"{self.root}. Two jobs must not write one run; if that job is gone or must stop, "
                        "pass takeover=True (CLI: --takeover) to take the run over",
                        holder,
                    )
                if holder:  # a dead holder is routine after a crash; a live one is worth a warning
                    log.log(
                        logging.WARNING if alive else logging.INFO,
                        "taking over %s from %s (host %r, pid %s)",
                        self.root,
                        "a live process" if alive else "a dead process",
                        holder.get("host"),
                        holder.get("pid"),
                    )
                lock.write()
            if not lock.is_ours():
                raise RunLockedError(f"another process took the lock of {self.root} at the same moment")
            lock.start(verify=True)
            self._run_lock = lock
            self._remove_stale_temps()

        _dist.on_coordinator(acquire, self.process_group)
        if self._run_lock is None:  # other ranks: a placeholder so they do not ask again
            self._run_lock = Heartbeat(self.backend, self._lock_path())

    def _remove_stale_temps(self) -> None:
        """Temporary files of an interrupted ``latest`` or lock rewrite (only the lock holder
        writes either; a killed process leaves ``.<name>.<hex>.tmp``)."""
        lock_name = self._lock_path().rsplit("/", 1)[-1]
        for name in self.backend.listdir(self.root.path):
            if name.startswith((f".{LATEST_NAME}.", f".{lock_name}.")) and name.endswith(".tmp"):
                try:
                    self.backend.remove(self.backend.join(self.root.path, name))
                except CheckpointError as exc:
                    log.warning("could not remove %s: %s", name, exc)

    def _release(self) -> None:
        lock, self._run_lock = self._run_lock, None
        if lock is None or lock._thread is None:
            return
        lock.stop(remove=False)
        if lock.lost is None and lock.is_ours():
            self.backend.remove(lock.path)

    def _recover_replaced(self) -> None:
        """Before a load: finish replacements of steps that a crash cut between their renames.

        Such a step has no directory, only a moved-aside copy and maybe a complete new one, and
        may be the newest good checkpoint. Only leftovers of dead writers are touched.
        """
        names = {
            self.backend.join(self.root.path, p[0])
            for e in self.backend.listdir(self.root.path)
            if (p := parse_leftover(e)) and p[2] == OLD_SUFFIX and _STEP_RE.match(p[0])
        }
        for path in sorted(names):
            if not self.backend.exists(path):
                try:
                    recover(self.backend, path)
                except CheckpointError as exc:  # read-only storage: load what is there
                    log.warning("could not recover %s: %s", self.backend.url(path), exc)

    def _cleanup_partials(self, keep: set[int]) -> None:
        """Finish interrupted replacements and drop dead leftovers of earlier saves.

        Only leftovers whose lease is dead are touched (see :mod:`ckptio.commit`), so saves in
        flight, this manager's or another process's, keep their staging directories.
        """

        def clean() -> None:
            leftovers: set[str] = set()  # step names with staging/moved-aside/lease entries
            step_dirs: list[str] = []
            for entry in self.backend.listdir(self.root.path):
                parsed = parse_leftover(entry)
                m = _STEP_RE.match(parsed[0] if parsed else entry)
                if m is None or int(m.group(1)) in keep:
                    continue
                path = self.backend.join(self.root.path, m.group(0))
                with self._lock:
                    if path in self._deleting:  # retention's thread is on it
                        continue
                if parsed:
                    leftovers.add(m.group(0))
                else:
                    step_dirs.append(path)
            for name in sorted(leftovers):
                try:
                    recover(self.backend, self.backend.join(self.root.path, name))
                except CheckpointError as exc:  # leftovers are invisible; never fail a save over them
                    log.warning("could not clean leftovers of %s: %s", name, exc)
            # a step directory without a manifest is a deletion cut short (the manifest goes first)
            # or an object-store save that died; while this manager holds the run lock, no save
            # of its own is in flight there (a save in place is in ``keep``)
            for path in step_dirs:
                if self.backend.exists(self.backend.join(path, MANIFEST_NAME)):
                    continue
                log.info("removing %s: it was never committed (or its deletion was cut short)", path)
                try:
                    self.backend.remove(path, recursive=True)
                except CheckpointError as exc:
                    log.warning("could not remove uncommitted %s: %s", path, exc)

        _dist.on_coordinator(clean, self.process_group)

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        final: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> SaveResult | None:
        """Save ``state`` as ``step``. Returns the result (``None`` when saving in the background).

        :param metrics: numbers stored in the manifest (retention's :class:`~ckptio.KeepBest` reads them).
        :param final: this is the last save of the run (``consolidated-hf`` exports it by default).
        :param metadata: JSON values stored in the manifest (:attr:`~ckptio.Manifest.metadata`).

        Raises a pending background failure first (:class:`~ckptio.AsyncSaveError`).
        """
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: must be a non-negative integer")
        self._raise_pending()
        self._acquire()
        if not self.async_save:
            self._cleanup_partials(set())
            result = self._save_now(step, state, state, metrics, final, metadata, self.process_group)
            self.last_result = result
            return result
        # wait for a free slot (and its staging buffers)
        while True:
            with self._lock:
                free = [
                    i
                    for i in range(self.max_in_flight)
                    if i not in self._stager_busy or self._stager_busy[i].done()
                ]
                busy = [f for f in self._stager_busy.values() if not f.done()]
            if free:
                break
            busy[0].exception()  # waits; errors are raised by _raise_pending
        self._raise_pending()
        slot = free[0]
        in_flight = {s for s, f in self._in_flight if not f.done()}
        self._cleanup_partials(in_flight)
        from .checkpoint import expand_state

        rank, _ = _dist.rank_and_size(self.process_group)
        t0 = time.perf_counter()
        staged = self._stagers[slot].stage(expand_state(state, rank))
        staging = time.perf_counter() - t0
        assert self._executor is not None
        fut = self._executor.submit(
            self._save_now, step, staged, state, metrics, final, metadata, self._bg_group, staging
        )
        with self._lock:
            self._stager_busy[slot] = fut
            self._in_flight.append((step, fut))
        return None

    def _save_now(
        self,
        step: int,
        state: dict[str, Any],
        user_state: dict[str, Any],
        metrics: dict[str, float] | None,
        final: bool,
        metadata: dict[str, Any] | None,
        pg: Any,
        staging: float | None = None,
    ) -> SaveResult:
        result, _ = save_checkpoint(
            state,
            self.url_of(step),
            backend=self.backend,
            process_group=pg,
            addons=self.addons,
            step=step,
            metrics=metrics,
            metadata=metadata,
            final=final,
            addon_state=user_state,
            format_options=self.save_options,
            # a background save draws no progress bar over the training output
            progress=False if staging is not None else None,
        )
        if staging is not None:
            result.timings = {"staging (blocking)": staging, **result.timings}
            log.info(
                "async save of step %d: %.2fs blocked in save() staging %.1f MB, then %.2fs in the background",
                step,
                staging,
                self._stagers[0].bytes_staged / 1e6,
                result.seconds,
            )
        self._metrics_cache[step] = decode_metrics(check_metrics(metrics))

        def publish() -> None:
            try:
                self.backend.write_bytes(
                    self.backend.join(self.root.path, LATEST_NAME), (step_name(step) + "\n").encode()
                )
            except CheckpointError as exc:
                # the step is committed; the pointer is only a hint (latest_step() scans without it)
                log.warning(
                    "step %d is committed, but the %s pointer was not updated: %s", step, LATEST_NAME, exc
                )
            self._apply_retention()

        _dist.on_coordinator(publish, pg)
        self.last_result = result
        return result

    # -- retention ----------------------------------------------------------------------------
    def protected_steps(self, steps: list[int] | None = None) -> set[int]:
        """Steps retention never deletes: the newest committed one and the one resumed from."""
        steps = self.steps() if steps is None else steps
        protected = {steps[-1]} if steps else set()
        if self.resumed_from is not None:
            protected.add(self.resumed_from)
        return protected

    def _apply_retention(self) -> set[int]:
        """Queue the deletion of the committed steps the policy drops; returns the ones it keeps.

        Steps already queued for deletion are neither candidates nor kept: their manifests may
        still be on disk, but a caller pruning what goes with them (the tiered manager's peer
        copies) must not read them as kept, and two threads applying retention at once must not
        queue one step twice."""
        with self._lock:
            deleting = set(self._deleting)
        steps = [s for s in self.steps() if self._step_path(s) not in deleting]
        infos = [StepInfo(s, self.metrics(s)) for s in steps]
        keep = self.retention.keep(infos) | self.protected_steps(steps)
        for s in steps:
            if s not in keep:
                self._delete_in_background(self._step_path(s))
                self._metrics_cache.pop(s, None)
        return keep & set(steps)

    def _delete_in_background(self, path: str) -> None:
        if self._deleter_thread is None or not self._deleter_thread.is_alive():
            self._deleter_thread = threading.Thread(
                target=self._delete_loop, name="ckptio-retention", daemon=True
            )
            self._deleter_thread.start()
        with self._lock:
            self._deleting.add(path)
        self._deleter.put(path)

    def _delete_loop(self) -> None:
        while True:
            path = self._deleter.get()
            try:
                if path is None:
                    return
                self._delete_path(path)
            except Exception as exc:  # retention must never stop training
                log.warning("retention could not delete %s: %s", self.backend.url(path or ""), exc)
            finally:
                with self._lock:
                    self._deleting.discard(path or "")
                self._deleter.task_done()

    def _delete_path(self, path: str) -> None:
        # uncommit first: a half-deleted step must not look like a checkpoint
        self.backend.remove(self.backend.join(path, MANIFEST_NAME))
        self.backend.remove(path, recursive=True)

    def delete(self, step: int, *, force: bool = False) -> StepDeletion:
        """Delete one step now, with whatever interrupted saves of it left behind.

        This is the one place a step is deleted by hand (``ckptio rm`` calls it), so that the
        rules below hold for every caller:

        * a step directory, committed or not, is removed under the run lock (a second live
          writer of this root is refused with :class:`~ckptio.RunLockedError`, unless the
          manager was made with ``takeover=True``); its manifest goes first, so a deletion cut
          short never leaves something that looks like a checkpoint;
        * the newest committed step and the step this manager resumed from are protected, as
          retention protects them, unless ``force``;
        * staging, moved-aside and lease entries of the step (:func:`ckptio.commit.remove_leftovers`)
          go too, except those of a save that is still running (a live lease): they are left
          alone and reported in :attr:`StepDeletion.busy`;
        * the ``latest`` pointer is then rewritten to the newest remaining committed step (or
          removed when none remains), so it never names a deleted step.

        Raises :class:`~ckptio.CheckpointNotFoundError` when nothing of ``step`` exists.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r}: must be a non-negative integer")
        if step not in self.all_steps():
            raise CheckpointNotFoundError(f"no step {step} under {self.root} (steps: {self.steps()})")
        path = self._step_path(step)
        committed = self._is_committed(step)
        has_dir = committed or self.backend.exists(path)
        if has_dir:
            self._acquire()  # the run lock: removing a step directory writes the run
        if committed and not force and step in self.protected_steps():
            raise CheckpointError(
                f"step {step} is protected (newest committed or resumed-from); pass force=True to delete it"
            )

        def work() -> StepDeletion:
            from .commit import remove_leftovers

            if committed:
                self._delete_path(path)
            elif has_dir:  # never committed, or a deletion cut short (the manifest goes first)
                self.backend.remove(path, recursive=True)
            self._metrics_cache.pop(step, None)
            n_leftovers, live = remove_leftovers(self.backend, path)
            if has_dir:  # this process holds the run lock: only the lock holder rewrites ``latest``
                self._repair_latest()
            return StepDeletion(step, committed, has_dir or n_leftovers > 0, live)

        result = _dist.on_coordinator(work, self.process_group, share_result=True)
        assert result is not None
        return result

    def _repair_latest(self) -> None:
        """Point ``latest`` at the newest committed step left (remove it when there is none)."""
        from .backend import read_limited

        pointer = self.backend.join(self.root.path, LATEST_NAME)
        steps = self.steps()  # the steps holding their manifest (the pointer is only a hint)
        latest = steps[-1] if steps else None
        try:
            text: str | None = read_limited(self.backend, pointer, 64, "latest pointer").decode(
                "utf-8", "replace"
            )
        except (CheckpointError, FileNotFoundError):
            text = None  # missing, or not a small regular file
        if latest is None:
            if self.backend.exists(pointer):
                self.backend.remove(pointer)
        elif text is None or text.strip() != step_name(latest):
            self.backend.write_bytes(pointer, (step_name(latest) + "\n").encode())

    # -- load ---------------------------------------------------------------------------------
    def load(
        self,
        state: dict[str, Any],
        step: int | str | os.PathLike[str] | None = "latest",
        *,
        strict: bool = True,
        verify: bool = True,
        init_from: str | os.PathLike[str] | None = None,
        source_storage_options: dict[str, Any] | None = None,
        **format_options: Any,
    ) -> LoadResult:
        """Load ``step`` (default: the newest committed one) into ``state`` in place.

        :param step: ``"latest"`` (or ``None``), a step number of this run, or the path or URL of a
            checkpoint **outside** the run: a Hugging Face directory (``save_pretrained``, a hub
            snapshot, ``hf-cache://org/name``), another run's step, any ``ckptio.load`` source.
            A path naming one of this run's own steps is that step.
        :param init_from: what to start from when ``step`` is ``"latest"`` and the run has no
            committed step yet (a base model, typically), so that "start the fine-tune from the
            base model, or resume if there is a checkpoint" is one call, the same on the first
            launch and on every restart. Once a step is committed it is ignored (logged at info),
            and so are the ``format_options``, which then belong to ``init_from``.
        :param source_storage_options: storage options for a source outside the run (``step`` or
            ``init_from`` as a URL). Default: the manager's own ``storage_options`` when the source
            is on the same store as the run (same scheme and same bucket or host), else none.
        :param format_options: the format's load options: for a foreign source those of
            ``ckptio.load`` (``dtype_policy``, ``key_mapping``, ``prefix``...), for a step of the
            run those its format declares (``dtype_policy="cast"``...). A name no installed format
            declares raises :class:`~ckptio.OptionError` before anything is read.

        A source outside the run is read with its own backend (a relative path is relative to the
        current directory; the URL's scheme picks the backend). The run's credentials go only to
        the run's own store (see ``source_storage_options``); another store gets its defaults and
        environment (``hf-cache://`` finds the cache through ``$HF_HUB_CACHE``...). It is loaded with the manager's process group and
        addons (``addons=["peft"]`` reads a PEFT adapter directory), but it is no step of this
        run: the result's ``step`` is ``None`` and its ``url`` is the source's, ``resumed_from``
        is left as it was and retention is unaffected. A step of the run gives its step number,
        so ``result.step is None`` tells a start from ``init_from`` from a resume.
        """
        source = foreign_source(step)
        named = source if source is not None else (os.fspath(init_from) if init_from is not None else None)
        fmt_name = parse_url(named).format if named is not None else None
        check_call_options(
            format_options,
            _LOAD_OWN,
            "load",
            fmt_name,
            "CheckpointManager.load" + (f" ({fmt_name} format)" if fmt_name else ""),
        )
        self.wait()
        if source is not None:
            return self._load_foreign(state, source, strict, verify, format_options, source_storage_options)
        _dist.on_coordinator(self._recover_replaced, self.process_group)
        if step in ("latest", None):
            resolved = self.latest_step()
            if resolved is None:
                if init_from is None:
                    raise CheckpointNotFoundError(
                        f"no committed checkpoint under {self.root} (to start from a base model when the run "
                        "has none, pass init_from=)"
                    )
                if _dist.rank_and_size(self.process_group)[0] == 0:
                    log.info(
                        "no committed checkpoint under %s yet: loading init_from=%s", self.root, init_from
                    )
                return self._load_foreign(
                    state, init_from, strict, verify, format_options, source_storage_options
                )
            if init_from is not None:  # the same call on every launch: the options were init_from's
                if _dist.rank_and_size(self.process_group)[0] == 0:
                    log.info(
                        "resuming step %d of %s; init_from=%s is not loaded", resolved, self.root, init_from
                    )
                format_options = {}
        elif isinstance(step, int) and not isinstance(step, bool):
            resolved = step
            if not self._is_committed(step):
                if step in self.all_steps():
                    raise IncompleteCheckpointError(f"step {step} under {self.root} was never committed")
                raise CheckpointNotFoundError(f"no step {step} under {self.root} (committed: {self.steps()})")
        else:
            raise ValueError(
                f"step={step!r}: expected an int, 'latest', or the path or URL of a checkpoint outside the run"
            )
        result = load_checkpoint(
            state,
            self.url_of(resolved),
            backend=self.backend,
            strict=strict,
            verify=verify,
            process_group=self.process_group,
            addons=self.addons,
            step=resolved,
            format_options=format_options,
        )
        self.resumed_from = resolved
        return result

    def _own_step(self, source: str) -> int | None:
        """The step of this run that ``source`` names (``<root>/step_N``), else ``None``."""
        u = parse_url(source)
        if u.scheme != self.root.scheme or u.format not in (None, self.root.format):
            return None
        path = os.path.realpath(u.path) if u.scheme == "file" else u.path
        parent, _, name = path.rstrip("/").rpartition("/")
        m = _STEP_RE.match(name)
        if not m or name != step_name(int(m.group(1))):  # step_5 is no name this run writes
            return None
        return int(m.group(1)) if parent == self.root.path.rstrip("/") else None

    def _load_foreign(
        self,
        state: dict[str, Any],
        source: str | os.PathLike[str],
        strict: bool,
        verify: bool,
        format_options: dict[str, Any],
        source_storage_options: dict[str, Any] | None,
    ) -> LoadResult:
        """Load a checkpoint from outside the run (see :meth:`load`) through its own backend."""
        own = self._own_step(os.fspath(source))
        if own is not None:  # the run's own step by its path: a resume, with retention's protection
            return self.load(state, own, strict=strict, verify=verify, **format_options)
        return load_foreign(
            state,
            source,
            root=self.root,
            storage_options=self.storage_options,
            source_storage_options=source_storage_options,
            process_group=self.process_group,
            addons=self.addons,
            strict=strict,
            verify=verify,
            format_options=format_options,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until background saves finish; raise the first failure."""
        for _, fut in list(self._in_flight):
            fut.exception()
        self._raise_pending()

    def close(self) -> None:
        """Wait for background work, stop the threads, raise any pending failure."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._deleter_thread is not None and self._deleter_thread.is_alive():
                self._deleter.put(None)
                self._deleter_thread.join(timeout=60)
            for stager in self._stagers:  # pinned host memory goes back now, not at GC
                stager.close()
            try:
                self._release()
            finally:
                self.backend.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a background one
            try:
                self.close()
            except Exception as bg:
                log.warning("while closing after an error: %s", bg)


_LOAD_OWN = declared_keywords(CheckpointManager.load)


def foreign_source(step: Any) -> str | None:
    """``step`` as the source of a load from outside the run, or ``None`` for ``"latest"``
    and step numbers. A digit string and a bare word that is no existing path are refused
    (``ValueError``): ``"3"`` from argv or ``"lastest"`` are mistakes, not directories."""
    if step is None or isinstance(step, int) or not isinstance(step, (str, os.PathLike)):
        return None
    text = os.fspath(step)
    if not isinstance(text, str) or text == "latest":
        return None
    if isinstance(step, str) and re.fullmatch(r"\s*[0-9]+\s*", text):  # a step number as text (argv)
        raise ValueError(
            f"step={step!r} is a string: pass the step number as an int (step={int(text)}), or "
            f"'./{text}' for a directory of that name"
        )
    u = parse_url(text)
    if (
        u.scheme == "file"
        and isinstance(step, str)
        and "/" not in text
        and os.sep not in text
        and not os.path.lexists(u.path)
    ):  # a bare word that is no path: a misspelt 'latest' more likely than a missing directory
        raise ValueError(
            f"step={step!r}: expected an int, 'latest', or the path or URL of a checkpoint outside "
            f"the run (there is no {u.path})"
        )
    return text


def load_foreign(
    state: dict[str, Any],
    source: str | os.PathLike[str],
    *,
    root: URL,
    storage_options: dict[str, Any] | None,
    source_storage_options: dict[str, Any] | None = None,
    process_group: Any,
    addons: AddonSet,
    strict: bool,
    verify: bool,
    format_options: dict[str, Any],
) -> LoadResult:
    """Load a checkpoint from outside the run whose root is ``root`` (a base model, another run's
    step) through its own backend, with ``source_storage_options``, else the run's
    ``storage_options`` when the source is on the run's own store (:func:`same_store`), else the
    store's defaults and environment. The result's ``step`` is ``None``: the source is no step
    of the run."""
    u = parse_url(os.fspath(source))
    if source_storage_options is None and same_store(u, root):
        source_storage_options = storage_options
    u, backend = open_backend(u, source_storage_options)
    with backend:  # opened here, closed here (client pools, event loops)
        result = load_checkpoint(
            state,
            u,
            backend=backend,
            strict=strict,
            verify=verify,
            process_group=process_group,
            addons=addons,
            format_options=format_options,
        )
    result.step = None  # not a step of this run (result.manifest still tells another run's step)
    return result


def same_store(u: URL, root: URL) -> bool:
    """Whether ``u`` is on the store that holds ``root``: the same scheme and, for remote stores,
    the same bucket, container, profile or host (the first component of the path). Only then do
    the run's storage options (credentials, endpoints) go with a load from outside the run."""
    if u.scheme != root.scheme:
        return False
    if u.scheme == "file":
        return True
    return u.path.split("/", 1)[0] == root.path.split("/", 1)[0]
