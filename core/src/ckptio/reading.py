"""Reading a checkpoint without a template: find it from a URL, get its contents as a new dict.

Why this module exists: :func:`ckptio.load` fills a state you already built (a model, an
optimizer) in place, which is what training wants. Tools want the opposite: the contents as they
were saved, the way ``torch.load`` or ``safetensors.torch.load_file`` return them, for a
checkpoint they know nothing about. Everything needed is in the DCP metadata every format
exposes: each tensor's global shape and dtype (a sharded checkpoint comes out whole) and, through
``planner_data``, the nesting of the original state (``{"model": {"0.weight": ...}}`` stays
nested). :func:`load_state` builds that dict; ``ckptio cp`` and :func:`ckptio.copy` read through
the same :class:`Source`, one tensor at a time, so that a conversion never holds the whole
checkpoint.

:func:`locate` turns what a user typed into one checkpoint: the checkpoint at the URL, or the
newest committed step (or a chosen one) of a :class:`~ckptio.CheckpointManager` root. The
command line uses it for every subcommand that takes one checkpoint.

Hostile metadata is refused before anything is allocated: state-dict paths that would build huge
lists or clash, and tensors larger than this machine's memory.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    StateMismatchError,
    translate,
)

#: Depth of a state-dict path in ``planner_data`` beyond which the metadata is taken as hostile.
MAX_PATH_DEPTH = 64


# -- finding a checkpoint --------------------------------------------------------------------------
@dataclass
class Located:
    """A checkpoint found from a URL: itself, or a step of a series root.

    :ivar url: the checkpoint's URL (a step's, when found under a root).
    :ivar backend: the backend it was read through (close it with :meth:`close`).
    :ivar manifest: its manifest; ``None`` for a foreign checkpoint a format recognised.
    :ivar fmt: its format (a :class:`~ckptio.Format`).
    :ivar via_root: the series root it was found under, if any.
    :ivar step: its step, when known.
    """

    url: Any  # ckptio.URL
    backend: Any
    manifest: Any
    fmt: Any
    via_root: str | None = None
    step: int | None = None

    def close(self) -> None:
        self.backend.close()


def open_series(
    url: Any, storage_options: dict[str, Any] | None = None
) -> tuple[Any, dict[int, bool]] | None:
    """``(manager, {step: committed})`` when ``url`` is a series root with step directories
    (committed or not), else ``None``. The caller closes the manager."""
    from .manager import CheckpointManager

    mgr = CheckpointManager(str(url), storage_options=storage_options)
    try:
        steps = mgr.all_steps()
    except BaseException:
        mgr.close()
        raise
    if not steps:
        mgr.close()
        return None
    return mgr, steps


def locate(
    url: Any,
    *,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    recover: bool = False,
) -> Located:
    """The checkpoint at ``url``; for a series root, its newest committed step (or ``step``).

    :param recover: first finish an interrupted replacement of ``url`` (as a load does); tools
        that only look (``ls``, ``inspect``) leave the store as it is.
    :raises CheckpointNotFoundError: nothing there, no committed step, or no such step.
    """
    from .checkpoint import find_format, open_backend, read_manifest
    from .manager import step_name

    u, backend = open_backend(url, storage_options)
    try:
        if recover:
            _recover(backend, u)
        if step is None:
            m = read_manifest(backend, u.path)
            if m is not None:
                return Located(u, backend, m, find_format(backend, u, m), step=m.step)
        series = open_series(u, storage_options)
        if series is not None:
            mgr, steps = series
            try:
                chosen = step if step is not None else mgr.latest_step()
                if chosen is None:
                    raise CheckpointNotFoundError(f"{u} holds steps but none is committed: {sorted(steps)}")
                if not steps.get(chosen, False):
                    raise CheckpointNotFoundError(
                        f"no committed step {chosen} under {u} (committed: {mgr.steps()})"
                    )
            finally:
                mgr.close()
            su = u.join(step_name(chosen))
            m = read_manifest(backend, su.path)
            return Located(su, backend, m, find_format(backend, su, m), via_root=str(u), step=chosen)
        if step is not None:
            raise CheckpointNotFoundError(f"{u} is not a checkpoint series (no step_* directories)")
        # a foreign checkpoint (e.g. a save_pretrained directory) that a format recognises
        return Located(u, backend, None, find_format(backend, u, None))
    except BaseException:
        backend.close()
        raise


def _recover(backend: Any, u: Any) -> None:
    import logging

    from .commit import recover

    try:
        recover(backend, u.path)
    except CheckpointError as exc:  # read-only storage: read what is there
        logging.getLogger("ckptio").warning("could not check %s for an interrupted save: %s", u, exc)


# -- reading it ------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Physical memory of this machine in bytes (``None`` where unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def state_path(fqn: str, raw: Any, n_entries: int, where: str) -> tuple[str | int, ...]:
    """The nesting of ``fqn`` in the original state dict, from ``planner_data``, checked so that
    hostile metadata cannot build huge lists (``["model", 300000000]``) or clash types."""
    if raw is None:
        return (fqn,)
    ok = (
        isinstance(raw, (list, tuple))
        and 0 < len(raw) <= MAX_PATH_DEPTH
        and isinstance(raw[0], str)
        and all(
            isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool) and 0 <= p < n_entries)
            for p in raw
        )
    )
    if not ok:
        raise CorruptCheckpointError(
            f"{where}: invalid state-dict path for {fqn!r}: {str(raw)[:200]}", path=where
        )
    return tuple(raw)


def _nbytes(meta: Any) -> int:
    return math.prod(tuple(meta.size)) * meta.properties.dtype.itemsize


class Source:
    """One checkpoint opened for template-free reads.

    The format's reader is built once (its metadata parsed and the declared file sizes checked
    once) and then serves any number of reads: the non-tensor values, a selection of tensors, or
    one tensor at a time (:meth:`read_tensors`), which is how :func:`ckptio.copy` streams.
    """

    def __init__(self, loc: Located, *, verify: bool = True) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.loc = loc
        self.where = str(loc.url)
        self.verify = verify
        self.reader = loc.fmt.storage_reader(
            loc.backend, loc.url.path, loc.manifest, None, verify=verify, progress=False
        )
        md = self.reader.read_metadata()
        self.metadata = md
        entries = md.state_dict_metadata
        mapping = md.planner_data if isinstance(md.planner_data, dict) else {}
        #: ``{fqn: TensorStorageMetadata}`` of every stored tensor, in the checkpoint's order.
        self.tensors: dict[str, Any] = {}
        #: Every stored non-tensor value's fqn.
        self.values: list[str] = []
        self.paths: dict[str, tuple[str | int, ...]] = {}
        for fqn, meta in entries.items():
            self.paths[fqn] = state_path(fqn, mapping.get(fqn), len(entries), self.where)
            if isinstance(meta, TensorStorageMetadata):
                sizes = tuple(meta.size)
                if any(not isinstance(s, int) or s < 0 for s in sizes):
                    raise CorruptCheckpointError(
                        f"{self.where}: tensor {fqn!r} has an invalid shape {sizes}", path=self.where
                    )
                self.tensors[fqn] = meta
            else:
                self.values.append(fqn)

    def select(self, keys: Iterable[str] | None) -> list[str]:
        """The stored fqns under ``keys`` (top-level keys or dotted ones: ``"model"`` selects
        ``model.*``; ``"model.0"`` selects ``model.0.weight`` and ``model.0.bias``), in the
        checkpoint's order. ``None`` selects everything."""
        fqns = list(self.paths)
        if keys is None:
            return fqns
        if isinstance(keys, str):
            keys = [keys]
        wanted = list(dict.fromkeys(keys))
        chosen = [f for f in fqns if any(f == k or f.startswith(k + ".") for k in wanted)]
        unknown = [k for k in wanted if not any(f == k or f.startswith(k + ".") for f in fqns)]
        if unknown:
            tops = sorted({str(p[0]) for p in self.paths.values()})
            raise StateMismatchError(
                f"{self.where} holds nothing under {', '.join(map(repr, unknown))} "
                f"(top-level keys: {', '.join(tops) or 'none'})",
                missing=unknown,
            )
        return chosen

    def check_memory(self, nbytes: int, what: str) -> None:
        """Refuse, before allocating, more than this machine's memory."""
        memory = available_memory()
        if memory is not None and nbytes > memory:
            raise CheckpointError(
                f"{self.where}: {what} takes {nbytes / 2**30:.1f} GiB, more than this machine's "
                f"{memory / 2**30:.1f} GiB of memory"
            )

    def nested(self, fqns: Iterable[str], tensor: Any, into: dict[str, Any] | None = None) -> dict[str, Any]:
        """A nested state (new, or ``into``) holding ``tensor(fqn, meta)`` for each tensor and
        ``None`` for each value of ``fqns``, at the places ``planner_data`` gives them."""
        from torch.distributed.checkpoint._traverse import set_element

        state: dict[str, Any] = {} if into is None else into
        for fqn in fqns:
            meta = self.tensors.get(fqn)
            try:
                set_element(state, self.paths[fqn], None if meta is None else tensor(fqn, meta))  # type: ignore[arg-type]
            except (RuntimeError, MemoryError) as exc:
                raise CheckpointError(f"{self.where}: cannot allocate tensor {fqn!r}: {exc}") from exc
            except (TypeError, IndexError, KeyError, AttributeError) as exc:
                raise CorruptCheckpointError(
                    f"{self.where}: the state-dict paths of its metadata clash at {fqn!r} ({exc})",
                    path=self.where,
                ) from exc
        return state

    def read_into(self, state: dict[str, Any]) -> None:
        """Fill a state built by :meth:`nested` (CPU tensors, ``None`` for values) in one read."""
        from .planner import SafeLoadPlanner

        self._load(state, SafeLoadPlanner(strict=False))

    def read_tensors(self, fqns: list[str], alloc: Any = None) -> dict[str, torch.Tensor]:
        """New CPU tensors for ``fqns`` (whole, however they were sharded), in one read.

        :param alloc: ``alloc(shape, dtype)`` makes each destination (default ``torch.empty``).
        """
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        self.check_memory(sum(_nbytes(self.tensors[f]) for f in fqns), f"tensor {fqns[0]!r}")
        alloc = alloc or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        flat = {f: alloc(tuple(self.tensors[f].size), self.tensors[f].properties.dtype) for f in fqns}
        # flat keys, no flattening: planning costs O(len(fqns)), not O(checkpoint), per read
        planner = DefaultLoadPlanner(
            flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True
        )
        self._load(flat, planner)
        return flat

    def _load(self, state: dict[str, Any], planner: Any) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=self.reader, planner=planner, no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if self.changed():
                raise self.replaced_error() from exc
            raise translate(exc, f"read {self.where}") from exc

    def changed(self) -> bool:
        """Whether the checkpoint is no longer the one whose manifest this source opened."""
        from .checkpoint import manifest_changed

        m = self.loc.manifest
        return m is not None and manifest_changed(self.loc.backend, self.loc.url.path, m)

    def replaced_error(self) -> ConcurrentWriteError:
        return ConcurrentWriteError(f"{self.where} was replaced by another save while it was being read")

    def check_unchanged(self) -> None:
        """Raise :class:`~ckptio.ConcurrentWriteError` when another save replaced the checkpoint
        while it was read (with ``verify=False`` a mix of two saves would go unnoticed)."""
        if self.changed():
            raise self.replaced_error()


def load_state(
    url: str,
    *,
    keys: Iterable[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint into a new nested dict of CPU tensors and values, without a template.

    Like ``torch.load`` or ``safetensors.torch.load_file``: no model or optimizer to build first.
    Any committed ckptio checkpoint (native or safetensors format, saved by any number of
    ranks: sharded tensors come out whole) and any checkpoint a format recognises (a
    ``save_pretrained`` directory) can be read. The nesting is the one that was saved::

        state = ckptio.load_state("s3://bucket/run/step_00000100")
        state["model"]["0.weight"], state["step"], state["optim"]["param_groups"][0]["lr"]
        model.load_state_dict(ckptio.load_state(url, keys=["model"])["model"])

    :param keys: read only these top-level or dotted keys (``["model"]``, ``["optim.state"]``,
        ``["model.0.weight"]``); a key that selects nothing raises
        :class:`~ckptio.StateMismatchError`. ``None`` reads everything.
    :param verify: check each chunk's checksum as it is read (on by default).
    :returns: a new dict; tensors are CPU tensors, values as saved (ints, strings, tuples...).
    :raises CheckpointError: the checkpoint is missing, damaged, larger than this machine's
        memory, or was replaced while it was read.
    """
    loc = locate(url, storage_options=storage_options, recover=True)
    try:
        if loc.via_root is not None:  # a series root: load_state takes one checkpoint, as load does
            raise CheckpointNotFoundError(
                f"{url} is a checkpoint series, not a checkpoint: pass one of its steps ({loc.url})"
            )
        src = Source(loc, verify=verify)
        fqns = src.select(keys)
        src.check_memory(sum(_nbytes(src.tensors[f]) for f in fqns if f in src.tensors), "its selection")
        state = src.nested(fqns, lambda fqn, meta: torch.empty(tuple(meta.size), dtype=meta.properties.dtype))
        src.read_into(state)
        src.check_unchanged()
        return state
    finally:
        loc.close()
