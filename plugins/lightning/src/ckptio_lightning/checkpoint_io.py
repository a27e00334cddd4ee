"""``CkptioCheckpointIO``: Lightning's ``CheckpointIO`` plugin, writing through ckptio.

Path mapping: the path Lightning passes (``<dirpath>/epoch=0-step=10.ckpt``, ``last.ckpt``, or a
``s3://``, ``gs://``, ``az://``, ``msc://`` URL) becomes a ckptio checkpoint *directory* of that
name, committed atomically (``manifest.json`` last). On object stores (backends whose commit
mode is ``marker``) a small JSON object is also written at the name itself, after the commit: it
gives fsspec's ``modified()``, which Lightning uses to pick ``ckpt_path="last"``, a timestamp, and
tells a human what the directory is. Removing a checkpoint removes that object first, then the
manifest (uncommit), then the data, all through the ckptio backend.

See ``docs/lightning.md`` for the rules on values and the Lightning behaviours this relies on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import ckptio
import torch
from ckptio.errors import CheckpointError, CheckpointNotFoundError, PluginError
from ckptio.ext import open_backend
from lightning.pytorch.plugins.io import AsyncCheckpointIO, CheckpointIO

from . import values
from .version import check_version

log = logging.getLogger("ckptio.lightning")

MANIFEST_NAME = "manifest.json"  # ckptio's commit marker (docs/commit-protocol.md)
STAMP_FORMAT = "ckptio-lightning"


class CkptioCheckpointIO(CheckpointIO):
    """Save, load and remove Lightning checkpoints through ckptio.

    ::

        trainer = Trainer(plugins=[CkptioCheckpointIO()])                       # local paths
        trainer = Trainer(plugins=[CkptioCheckpointIO(storage_options={...})],  # s3://, gs://...
                          default_root_dir="s3://bucket/run")

    :param storage_options: passed to the ckptio backend on every call (endpoint, credentials);
        ``trainer.save_checkpoint(path, storage_options={...})`` adds to them for one save.
    :param verify: check every chunk's checksum while loading (on by default).
    :param save_options: format options for every save (e.g. ``thread_count``).
    :raises ckptio.PluginError: the installed Lightning is outside the tested range
        (:data:`ckptio_lightning.SUPPORTED_LIGHTNING`); the message names it.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        verify: bool = True,
        **save_options: Any,
    ) -> None:
        super().__init__()
        self.lightning_version = check_version()
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.verify = verify
        self.save_options = save_options
        self._cv = threading.Condition()
        self._saving: dict[str, int] = {}  # url -> saves in progress (AsyncCheckpointIO's thread)
        self._saving_threads: set[int] = set()
        self._solo_group: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``strategy="ddp_spawn"`` sends the plugin to each process): the lock, the
        in-progress bookkeeping and the process group are per process."""
        state = dict(self.__dict__)
        for name in ("_cv", "_saving", "_saving_threads", "_solo_group"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cv = threading.Condition()
        self._saving = {}
        self._saving_threads = set()
        self._solo_group = None

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
        :class:`ckptio.StateMismatchError` naming its key, before anything is written.
        """
        options = self._options(storage_options)
        url = self.url(path)
        tensors, skeleton = values.split(checkpoint)  # refuses unsafe values before any I/O
        # a 1-tuple: DCP stores a tuple as one value (ckptio: one JSON value), where it would
        # flatten a dict into one entry per leaf
        state: dict[str, Any] = {**tensors, values.STATE_KEY: (skeleton,)}
        info: dict[str, Any] = {"lightning": self.lightning_version}
        for key in ("epoch", "global_step"):
            if type(checkpoint.get(key)) is int:
                info[key] = checkpoint[key]
        with self._busy(url), self._leaf(url, options) as (backend, leaf):
            if ckptio.parse_url(url).scheme == "file" and os.path.islink(leaf):
                backend.remove(leaf)  # a link from save_last="link": replace it, never save through it
            ckptio.save(
                state,
                url,
                storage_options=options,
                metadata={"lightning": info},
                process_group=self._process_group(),
                **self.save_options,
            )
            if backend.commit_mode == "marker":
                stamp = {"format": STAMP_FORMAT, "checkpoint": f"{ckptio.parse_url(url).name}/", **info}
                backend.write_bytes(leaf, json.dumps(stamp).encode())
        log.debug("saved Lightning checkpoint %s", url)

    @contextmanager
    def _busy(self, url: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._cv:
            self._saving[url] = self._saving.get(url, 0) + 1
            self._saving_threads.add(me)
        try:
            yield
        finally:
            with self._cv:
                self._saving[url] -= 1
                if not self._saving[url]:
                    del self._saving[url]
                self._saving_threads.discard(me)
                self._cv.notify_all()

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

        A save of the same path still running (or queued in Lightning's ``AsyncCheckpointIO``)
        is waited for first, so it cannot bring the checkpoint back after its removal.
        """
        url = self.url(path)
        self._wait_for_queued_saves()
        with self._cv:
            while self._saving.get(url):
                self._cv.wait()
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
        """Nothing to release: every call opens and closes its own backend."""


def _device(map_location: Any) -> torch.device | None:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return None
    if isinstance(map_location, (str, int, torch.device)):
        device = torch.device(map_location)
        return None if device.type == "cpu" and device.index is None else device
    raise TypeError(f"map_location must be a device, a dict or a callable, got {type(map_location).__name__}")
