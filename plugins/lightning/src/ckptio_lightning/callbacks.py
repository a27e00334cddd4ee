"""``CkptioModelCheckpoint``: Lightning's ``ModelCheckpoint``, with ``ckpt_path="last"`` fixed
for object stores.

Lightning (2.5, 2.6) resolves ``fit(ckpt_path="last")`` from ``ModelCheckpoint`` by listing its
``dirpath`` with fsspec. On a remote ``dirpath`` the listing drops the protocol
(``bucket/run/last.ckpt``), so the path is then looked up on the *local* disk, nothing is found,
and training silently starts from scratch (Lightning issue #18261), whatever the CheckpointIO.
This subclass puts the protocol back, lists afresh (fsspec caches listings per process), and
only offers checkpoints whose marker object exists (written by :class:`CkptioCheckpointIO` after
the commit; see its module docstring), so Lightning's ``fs.modified()`` has a timestamp to
compare. On a local ``dirpath`` it behaves exactly like ``ModelCheckpoint``.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from .version import check_version


class CkptioModelCheckpoint(ModelCheckpoint):
    """Drop-in ``ModelCheckpoint`` (same arguments) whose ``last`` checkpoints are found on
    object stores too. Needed with a ``s3://``, ``gs://``, ``az://`` or ``msc://`` ``dirpath``
    for ``ckpt_path="last"``; harmless elsewhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_version()
        super().__init__(*args, **kwargs)

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        ckpt_dir = self.dirpath if self.dirpath is not None else None
        if ckpt_dir is None or _is_local(str(ckpt_dir)):
            return super()._find_last_checkpoints(trainer)
        fs = self._fs
        fs.invalidate_cache()  # the listing taken at setup (or by another instance) is stale
        if not fs.exists(ckpt_dir):
            return set()
        found: set[str] = set()
        for entry in fs.ls(ckpt_dir, detail=True):
            name = str(entry["name"]).rstrip("/")
            base = name.rsplit("/", 1)[-1]
            stem, ext = os.path.splitext(base)
            if ext != self.FILE_EXTENSION or not _is_last_stem(stem, self.CHECKPOINT_NAME_LAST):
                continue
            if entry.get("type") != "file":  # a directory without its marker: not committed
                continue
            found.add(fs.unstrip_protocol(name))
        # Lightning then asks fs.modified() of each: from a fresh HEAD, which sees the marker
        # object, not from this listing, where the directory of the same name may come first
        fs.invalidate_cache()
        return found


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _is_last_stem(stem: str, last: str | None) -> bool:
    import re

    return bool(last) and re.match(rf"^{re.escape(str(last))}(-(\d+))?", stem) is not None
