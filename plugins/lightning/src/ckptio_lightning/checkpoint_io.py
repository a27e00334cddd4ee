"""``CkptioCheckpointIO``: Lightning's ``CheckpointIO`` plugin, writing through ckptio.

Path mapping: the path Lightning passes (``<dirpath>/epoch=0-step=10.ckpt``, ``last.ckpt``, or a
``s3://``, ``gs://``, ``az://``, ``msc://`` URL) becomes a ckptio checkpoint *directory* of that
name, committed atomically (``manifest.json`` last). On object stores (backends whose commit
mode is ``marker``) a small JSON object is also written at the name itself, after the commit: it
gives fsspec's ``modified()``, which Lightning uses to pick ``ckpt_path="last"``, a timestamp, and
tells a human what the directory is. Removing a checkpoint removes that object first, then the
manifest (uncommit), then the data, all through the ckptio backend.

Asynchronous saves (``async_save=True``): ``save_checkpoint`` checks the values and copies the
tensors into host buffers kept from one save to the next (ckptio's ``HostStager``), then returns;
one background thread writes and commits. Lightning's own ``AsyncCheckpointIO`` wrapper works too,
but clones every tensor into fresh memory on the training thread at every save.

See ``docs/lightning.md`` for the rules on values and the Lightning behaviours this relies on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from typing import Any

import ckptio
import torch
from ckptio.errors import AsyncSaveError, CheckpointError, CheckpointNotFoundError, PluginError
from ckptio.ext import HostStager, open_backend
from lightning.pytorch.plugins.io import AsyncCheckpointIO, CheckpointIO

from . import values
from .version import check_version

log = logging.getLogger("ckptio.lightning")

MANIFEST_NAME = "manifest.json"  # ckptio's commit marker (docs/commit-protocol.md)
STAMP_FORMAT = "ckptio-lightning"
_RUNTIME = (  # per-process state: never pickled (``ddp_spawn``), rebuilt by ``_init_runtime``
    "_cv",
    "_saving",
    "_saving_threads",
    "_solo_group",
    "_stage_lock",
    "_executor",
    "_stagers",
    "_slots",
    "_jobs",
)


class CkptioCheckpointIO(CheckpointIO):
    """Save, load and remove Lightning checkpoints through ckptio.

    ::

        trainer = Trainer(plugins=[CkptioCheckpointIO()])                       # local paths
        trainer = Trainer(plugins=[CkptioCheckpointIO(storage_options={...})],  # s3://, gs://...
                          default_root_dir="s3://bucket/run")
        trainer = Trainer(plugins=[CkptioCheckpointIO(async_save=True)])        # write in background

    :param storage_options: passed to the ckptio backend on every call (endpoint, credentials);
        ``trainer.save_checkpoint(path, storage_options={...})`` adds to them for one save.
    :param verify: check every chunk's checksum while loading (on by default).
    :param async_save: return from ``save_checkpoint`` once the values are checked and the tensors
        copied into host buffers that are reused by the next save of the same layout; one
        background thread then writes and commits. A background failure is raised (as
        :class:`ckptio.AsyncSaveError`, naming the checkpoint) by the next ``save_checkpoint``,
        ``wait()`` or ``teardown()``. Do not also wrap the plugin in Lightning's
        ``AsyncCheckpointIO``: that would copy every tensor twice.
    :param max_in_flight: with ``async_save``, how many saves may be staged and not yet written
        (each holds its own host copy of the checkpoint); a further save waits for the oldest.
    :param save_options: format options for every save (e.g. ``thread_count``).
    :raises ckptio.PluginError: the installed Lightning is outside the tested range
        (:data:`ckptio_lightning.SUPPORTED_LIGHTNING`); the message names it.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        verify: bool = True,
        async_save: bool = False,
        max_in_flight: int = 1,
        **save_options: Any,
    ) -> None:
        super().__init__()
        self.lightning_version = check_version()
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool, got {type(async_save).__name__}")
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r}: must be an int >= 1")
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.verify = verify
        self.async_save = async_save
        self.max_in_flight = max_in_flight
        self.save_options = save_options
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._cv = threading.Condition()
        self._saving: dict[str, int] = {}  # url -> saves queued or running (this plugin's or a wrapper's)
        self._saving_threads: set[int] = set()
        self._solo_group: Any = None
        # async_save: one writer thread; per slot, a stager and the save using its buffers
        self._stage_lock = threading.Lock()  # one caller at a time picks a slot and fills it
        self._executor: ThreadPoolExecutor | None = None
        self._stagers: list[HostStager | None] = [None] * self.max_in_flight
        self._slots: list[Future[None] | None] = [None] * self.max_in_flight
        self._jobs: list[tuple[str, Future[None]]] = []  # background saves not yet reported

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``strategy="ddp_spawn"`` sends the plugin to each process): the lock, the
        in-progress bookkeeping, the writer thread, the host buffers and the process group are
        per process."""
        state = dict(self.__dict__)
        for name in _RUNTIME:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("async_save", False)
        self.__dict__.setdefault("max_in_flight", 1)
        self._init_runtime()

    # -- paths -------------------------------------------------------------------------------
    @staticmethod
    def url(path: str | os.PathLike[str]) -> str:
        """The ckptio URL of a path Lightning passes: the checkpoint directory of that name."""
        return str(ckptio.parse_url(os.fspath(path)))

    def _options(self, extra: Any = None) -> dict[str, Any]:
        if extra is None:
            return dict(self.storage_options)
        if not isinstance(extra, dict):
            raise TypeError(
                f"storage_options for {type(self).__name__} must be a dict of ckptio storage options, "
                f"got {type(extra).__name__}"
            )
        return {**self.storage_options, **extra}

    @contextmanager
    def _leaf(self, url: str, options: dict[str, Any]) -> Iterator[tuple[Any, str]]:
        """``(backend, path)`` of the checkpoint's own name, opened through its parent so that
        a link planted at the name (``save_last="link"``) is seen as a link, not followed."""
        u = ckptio.parse_url(url)
        parent, backend = open_backend(str(u.parent), options)
        with backend:
            yield backend, backend.join(parent.path, u.name)

    # -- save --------------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` as a ckptio checkpoint directory at ``path`` (atomically).

        Non-tensor values are stored as JSON; one that cannot be (an arbitrary object) raises
        :class:`ckptio.StateMismatchError` naming its key, before anything is written (with
        ``async_save`` too: the check runs before this returns).

        With ``async_save``, this returns once the tensors are copied into host buffers; the
        write runs in the background (see the class docstring).
        """
        options = self._options(storage_options)
        url = self.url(path)
        tensors, skeleton = values.split(checkpoint)  # refuses unsafe values before any I/O
        info: dict[str, Any] = {"lightning": self.lightning_version}
        for key in ("epoch", "global_step"):
            if type(checkpoint.get(key)) is int:
                info[key] = checkpoint[key]
        group = self._process_group()
        if self.async_save:
            self._save_in_background(tensors, skeleton, url, options, info, group)
            return
        with self._busy(url):
            self._write(tensors, skeleton, url, options, info, group)

    def _write(
        self,
        tensors: dict[str, torch.Tensor],
        skeleton: dict[str, Any],
        url: str,
        options: dict[str, Any],
        info: dict[str, Any],
        group: Any,
    ) -> None:
        """The save itself: commit the checkpoint directory, then (object stores) its marker."""
        # a 1-tuple: DCP stores a tuple as one value (ckptio: one JSON value), where it would
        # flatten a dict into one entry per leaf
        state: dict[str, Any] = {**tensors, values.STATE_KEY: (skeleton,)}
        with self._leaf(url, options) as (backend, leaf):
            if ckptio.parse_url(url).scheme == "file" and os.path.islink(leaf):
                backend.remove(leaf)  # a link from save_last="link": replace it, never save through it
            ckptio.save(
                state,
                url,
                storage_options=options,
                metadata={"lightning": info},
                process_group=group,
                **self.save_options,
            )
            if backend.commit_mode == "marker":
                stamp = {"format": STAMP_FORMAT, "checkpoint": f"{ckptio.parse_url(url).name}/", **info}
                backend.write_bytes(leaf, json.dumps(stamp).encode())
        log.debug("saved Lightning checkpoint %s", url)

    @contextmanager
    def _busy(self, url: str) -> Iterator[None]:
        """A save of ``url`` on this thread (a removal of ``url`` waits for it)."""
        me = threading.get_ident()
        with self._cv:
            self._saving_threads.add(me)
        self._enter(url)
        try:
            yield
        finally:
            with self._cv:
                self._saving_threads.discard(me)
            self._leave(url)

    def _enter(self, url: str) -> None:
        with self._cv:
            self._saving[url] = self._saving.get(url, 0) + 1

    def _leave(self, url: str) -> None:
        with self._cv:
            self._saving[url] -= 1
            if not self._saving[url]:
                del self._saving[url]
            self._cv.notify_all()

    def _wait_for(self, url: str) -> None:
        """Until no save of ``url`` is queued or running."""
        with self._cv:
            while self._saving.get(url):
                self._cv.wait()

    # -- async_save --------------------------------------------------------------------------
    def _save_in_background(
        self,
        tensors: dict[str, torch.Tensor],
        skeleton: dict[str, Any],
        url: str,
        options: dict[str, Any],
        info: dict[str, Any],
        group: Any,
    ) -> None:
        """Stage ``tensors`` into a free slot's reused host buffers, queue the write, return.

        ``skeleton`` is already a copy (:func:`values.split` builds it from immutable leaves),
        so training may change anything in the checkpoint once this returns.
        """
        self._raise_pending()  # an earlier background failure stops training here
        with self._stage_lock:
            t0 = time.perf_counter()
            slot = self._free_slot()
            t1 = time.perf_counter()
            stager = self._stagers[slot]
            if stager is None:
                stager = self._stagers[slot] = HostStager()
            staged = stager.stage(tensors)  # buffers reused when name and layout match
            t2 = time.perf_counter()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptio-lightning")
            self._enter(url)  # from now on a removal (or load) of ``url`` waits for this save
            try:
                fut = self._executor.submit(self._background, staged, skeleton, url, options, info, group, t2)
            except BaseException:
                self._leave(url)
                raise
            with self._cv:
                self._slots[slot] = fut
                self._jobs.append((url, fut))
        log.debug(
            "queued Lightning checkpoint %s: %.3fs waiting for a free slot, %.3fs staging %.1f MB",
            url,
            t1 - t0,
            t2 - t1,
            stager.bytes_staged / 1e6,
        )

    def _free_slot(self) -> int:
        """A slot whose buffers no save is using; waits for the oldest save when all are busy."""
        while True:
            with self._cv:
                busy = [f for f in self._slots if f is not None and not f.done()]
                for i, f in enumerate(self._slots):
                    if f is None or f.done():
                        return i
            wait_futures(busy, return_when=FIRST_COMPLETED)
            self._raise_pending()  # the save waited for failed: stop before staging this one

    def _background(
        self,
        tensors: dict[str, torch.Tensor],
        skeleton: dict[str, Any],
        url: str,
        options: dict[str, Any],
        info: dict[str, Any],
        group: Any,
        queued_at: float,
    ) -> None:
        try:
            t0 = time.perf_counter()
            self._write(tensors, skeleton, url, options, info, group)
            log.debug(
                "wrote Lightning checkpoint %s in the background: %.3fs queued, %.3fs writing",
                url,
                t0 - queued_at,
                time.perf_counter() - t0,
            )
        finally:
            self._leave(url)

    def _raise_pending(self, url: str | None = None) -> None:
        """Raise the first failure of a finished background save (of ``url``, if given) as
        :class:`ckptio.AsyncSaveError`; each failure is raised once."""
        with self._cv:
            done = [(u, f) for u, f in self._jobs if f.done() and (url is None or u == url)]
            self._jobs = [j for j in self._jobs if j not in done]
        failed = [(u, exc) for u, f in done if (exc := f.exception()) is not None]
        if not failed:
            return
        for u, exc in failed[1:]:
            log.error("background save of Lightning checkpoint %s failed too: %s", u, exc)
        u, exc = failed[0]
        raise AsyncSaveError(f"background save of Lightning checkpoint {u} failed: {exc}") from exc

    def wait(self) -> None:
        """Block until every background save (``async_save``) is written; raise the first
        failure not raised yet. Returns at once when nothing is in flight."""
        with self._cv:
            pending = [f for _, f in self._jobs]
        wait_futures(pending)
        self._raise_pending()

    def _process_group(self) -> Any:
        """``None`` on one process. Under DDP Lightning calls the plugin on global rank 0 only,
        so the save must not wait for the other ranks: it runs in a group of this rank alone."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        if self._solo_group is None:
            self._solo_group = dist.new_group(
                ranks=[dist.get_rank()], backend="gloo", use_local_synchronization=True
            )
        return self._solo_group

    # -- load --------------------------------------------------------------------------------
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read the checkpoint directory at ``path`` back into Lightning's checkpoint dict.

        Nothing is unpickled whatever ``weights_only`` says. Tensors come back on the CPU, or on
        ``map_location`` when it is a device (a string, ``torch.device`` or index); a dict or a
        callable leaves them on the CPU (they hold no device information to remap).
        """
        url = self.url(path)
        self._wait_for(url)  # a save of it still in the background: read what it writes
        self._raise_pending(url)
        u = ckptio.parse_url(url)
        if u.scheme == "file" and os.path.isfile(u.path):
            raise CheckpointError(
                f"{os.fspath(path)} is a file, not a ckptio checkpoint directory (probably written by "
                "torch.save through Lightning's default TorchCheckpointIO). ckptio never unpickles; "
                "load it without CkptioCheckpointIO, then save it again with it."
            )
        load_state = getattr(ckptio, "load_state", None)
        if load_state is None:  # pragma: no cover - a core older than the one this needs
            raise PluginError("ckptio-lightning needs ckptio.load_state: upgrade ckptio")
        raw = load_state(url, storage_options=self._options(), verify=self.verify)
        boxed = raw.pop(values.STATE_KEY, None)
        skeleton = boxed[0] if isinstance(boxed, tuple) and len(boxed) == 1 else None
        if skeleton is None:
            raise CheckpointError(
                f"{url} is a ckptio checkpoint, but not one CkptioCheckpointIO wrote (no "
                f"{values.STATE_KEY!r} entry); read it with ckptio.load_state or ckptio.load"
            )
        device = _device(map_location)
        tensors: dict[str, torch.Tensor] = {}
        stack: list[tuple[str, Any]] = list(raw.items())
        while stack:  # flat as saved; nested only if planner_data were absent
            key, value = stack.pop()
            if isinstance(value, torch.Tensor):
                tensors[key] = value if device is None else value.to(device)
            elif isinstance(value, dict):
                stack.extend((f"{key}.{k}", v) for k, v in value.items())
        return values.join(skeleton, tensors, url)

    # -- remove ------------------------------------------------------------------------------
    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path`` through the ckptio backend: the marker object, then
        ``manifest.json`` (so a half-deleted checkpoint never looks committed), then the rest.

        A save of the same path still running or queued (``async_save``, or Lightning's
        ``AsyncCheckpointIO``) is waited for first, so it cannot bring the checkpoint back after
        its removal.
        """
        url = self.url(path)
        self._wait_for_queued_saves()
        self._wait_for(url)
        with self._leaf(url, self._options()) as (backend, leaf):
            if backend.commit_mode == "marker":
                backend.remove(leaf)  # the marker object: "last" stops finding it first
            if ckptio.parse_url(url).scheme == "file" and os.path.islink(leaf):
                backend.remove(leaf)  # save_last="link": the link only, never what it points to
                return
            try:
                backend.remove(backend.join(leaf, MANIFEST_NAME))
            except CheckpointNotFoundError:
                pass
            backend.remove(leaf, recursive=True)
        log.debug("removed Lightning checkpoint %s", url)

    def _wait_for_queued_saves(self) -> None:
        """Lightning's ``AsyncCheckpointIO`` queues saves on its own thread but calls
        ``remove_checkpoint`` directly, so a save still queued would recreate a checkpoint removed
        before it ran (ModelCheckpoint's top-k would keep more than k). When called through such a
        wrapper, wait until the saves queued before this removal are done."""
        frame = sys._getframe(1)
        for _ in range(8):
            frame = frame.f_back  # type: ignore[assignment]
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if isinstance(owner, AsyncCheckpointIO):
                executor = getattr(owner, "_executor", None)
                if (
                    isinstance(executor, ThreadPoolExecutor)
                    and threading.get_ident() not in self._saving_threads
                ):
                    executor.submit(lambda: None).result()
                return

    def teardown(self) -> None:
        """Called by Lightning at the end of ``fit``/``validate``/``test``, also after an error:
        wait for the background saves, stop the writer thread, release the host buffers, and
        raise a background failure not raised yet. (Every other call opens and closes its own
        backend.) The plugin can be used again afterwards."""
        try:
            self.wait()
        finally:
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)
            stagers, self._stagers = self._stagers, [None] * self.max_in_flight
            self._slots = [None] * self.max_in_flight
            for stager in stagers:
                if stager is not None:
                    stager.close()  # pinned host memory goes back now, not at collection


def _device(map_location: Any) -> torch.device | None:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return None
    if isinstance(map_location, (str, int, torch.device)):
        device = torch.device(map_location)
        return None if device.type == "cpu" and device.index is None else device
    raise TypeError(f"map_location must be a device, a dict or a callable, got {type(map_location).__name__}")
