"""Save and load one checkpoint: plan with DCP, write through a format, commit through the backend.

The commit protocol, the same for every format:

1. The coordinator prepares the target. ``rename`` backends write into a hidden staging
   directory ``.<name>.ckptio-partial`` beside the target; ``marker`` backends (object stores)
   write in place after removing any old ``manifest.json`` (the marker) first.
2. Every rank writes its data (DCP plans, the format writes files through the backend, durably).
3. The coordinator writes ``manifest.json`` last: the list of files with sizes and checksums,
   the format's metadata and the step's metrics. On ``rename`` backends the staging directory is
   then renamed over the target (the old one is moved aside first and removed after).

A checkpoint without a valid manifest does not exist for loading, listing or retention, so a crash
at any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from . import _dist
from .addons import AddonContext, AddonSet
from .backend import Backend
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    translate,
)
from .manifest import MANIFEST_NAME, Manifest
from .planner import SafeLoadPlanner, SafeSavePlanner
from .plugins import backend_factory, format_names, get_format
from .state import PerRank, RNGState
from .url import URL, parse_url

log = logging.getLogger("ckptio")

PARTIAL_SUFFIX = ".ckptio-partial"
OLD_SUFFIX = ".ckptio-old"


@dataclass
class SaveResult:
    """What a save did. ``bytes`` counts every rank's data (known on the coordinator)."""

    url: str
    step: int | None
    bytes: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    manifest: Manifest | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class LoadResult:
    """What a load did: keys missing from the checkpoint (non-strict), keys it had in excess."""

    url: str
    step: int | None
    bytes: int
    seconds: float
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def open_backend(url: str | URL, storage_options: dict[str, Any] | None = None) -> tuple[URL, Backend]:
    """Parse ``url`` and build the backend that serves its scheme."""
    u = parse_url(url)
    factory = backend_factory(u.scheme)
    try:
        return u, factory(u, **(storage_options or {}))
    except CheckpointError:
        raise
    except Exception as exc:  # a backend's client library refusing its options (bad credentials...)
        raise translate(exc, f"opening the {u.scheme}:// backend for {u}") from exc


def staging_path(backend: Backend, path: str) -> str:
    parent, name = path.rstrip("/").rsplit("/", 1) if "/" in path.rstrip("/") else ("", path)
    return backend.join(parent, f".{name}{PARTIAL_SUFFIX}") if parent else f".{name}{PARTIAL_SUFFIX}"


def read_manifest(backend: Backend, path: str) -> Manifest | None:
    """The manifest at ``path``, ``None`` when there is none; damaged ones raise."""
    mpath = backend.join(path, MANIFEST_NAME)
    try:
        data = backend.read_bytes(mpath)
    except (CheckpointNotFoundError, FileNotFoundError):
        return None
    return Manifest.from_bytes(data, backend.url(mpath))


# -- state expansion -------------------------------------------------------------------------
def expand_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Replace ``Stateful`` values by their state dicts and ``PerRank`` values by ``{rank<N>: v}``."""
    if not isinstance(state, dict):
        raise CheckpointError(f"state must be a dict, got {type(state).__name__}")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, RNGState):
            out[key] = {f"rank{rank}": value.state_dict()}
        elif isinstance(value, PerRank):
            inner = value.value
            out[key] = {f"rank{rank}": inner.state_dict() if isinstance(inner, Stateful) else inner}
        elif isinstance(value, Stateful) and not isinstance(value, dict):
            out[key] = value.state_dict()
        else:
            out[key] = value
    return out


def restore_state(state: dict[str, Any], expanded: dict[str, Any], rank: int) -> None:
    """Hand loaded values back: ``load_state_dict`` for Stateful values, assignment otherwise."""
    for key, value in state.items():
        loaded = expanded.get(key)
        if isinstance(value, RNGState):
            value.load_state_dict(loaded[f"rank{rank}"])  # type: ignore[index]
        elif isinstance(value, PerRank):
            sub = loaded.get(f"rank{rank}") if isinstance(loaded, dict) else None
            if isinstance(value.value, Stateful):
                value.value.load_state_dict(sub or {})
            else:
                value.value = sub
        elif isinstance(value, Stateful) and not isinstance(value, dict):
            value.load_state_dict(loaded if isinstance(loaded, dict) else {})
        else:
            state[key] = loaded


# -- save ----------------------------------------------------------------------------------
def prepare_target(
    backend: Backend,
    final: str,
    *,
    overwrite: bool,
    what: str,
    hint: str = "pass overwrite=True to replace it",
) -> str:
    """Make room for a new checkpoint at ``final``; return where its files go until the commit.

    ``rename`` backends get an empty staging directory beside ``final`` (the old checkpoint stays
    loadable until the commit); ``marker`` backends write in place, so the old manifest is removed
    first, which makes the old checkpoint invisible before any of it is overwritten.
    """
    if not overwrite and backend.exists(backend.join(final, MANIFEST_NAME)):
        raise CheckpointError(f"{what} already holds a committed checkpoint ({hint})")
    if backend.commit_mode == "rename":
        data_dir = staging_path(backend, final)
        backend.remove(data_dir, recursive=True)
        backend.makedirs(data_dir)
        return data_dir
    backend.remove(backend.join(final, MANIFEST_NAME))
    backend.remove(final, recursive=True)
    backend.makedirs(final)
    return final


def commit_target(backend: Backend, data_dir: str, final: str, manifest: bytes) -> None:
    """Write ``manifest.json`` last, then (``rename`` backends) swap the staging directory in.

    A replaced checkpoint is moved aside first and removed only after the new one is in place;
    the manager rolls an interrupted swap forward on its next save or load.
    """
    backend.write_bytes(backend.join(data_dir, MANIFEST_NAME), manifest)
    if backend.commit_mode != "rename":
        return
    backend.fsync_dir(data_dir)
    old = data_dir.removesuffix(PARTIAL_SUFFIX) + OLD_SUFFIX
    replaced = backend.exists(final)
    if replaced:
        backend.remove(old, recursive=True)
        backend.rename(final, old)
    backend.rename(data_dir, final)
    backend.fsync_dir(final.rstrip("/").rsplit("/", 1)[0] or "/")
    if replaced:
        backend.remove(old, recursive=True)


def save_checkpoint(
    state: dict[str, Any],
    url: str | URL,
    *,
    backend: Backend | None = None,
    format: str | None = None,
    process_group: Any = None,
    addons: AddonSet | None = None,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    user_metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = True,
    is_final: bool = False,
    run_after_commit: bool = True,
    addon_state: dict[str, Any] | None = None,
    **format_options: Any,
) -> tuple[SaveResult, AddonContext]:
    """The full save protocol (see the module docstring). Returns the result and the addon
    context (the manager runs ``after_commit`` itself when saving in the background)."""
    t0 = time.perf_counter()
    u = parse_url(url)
    if backend is None:
        u, backend = open_backend(u, storage_options)
    pg = process_group
    rank, world = _dist.rank_and_size(pg)
    fmt = get_format(format or u.format or "native")
    addons = addons or AddonSet()
    final = u.path
    data_dir = staging_path(backend, final) if backend.commit_mode == "rename" else final

    _dist.on_coordinator(lambda: prepare_target(backend, final, overwrite=overwrite, what=str(u)), pg)
    t_prep = time.perf_counter()

    expanded = expand_state(state, rank)
    ctx = AddonContext(
        op="save",
        url=u,
        backend=backend,
        path=final,
        write_path=data_dir,
        step=step,
        rank=rank,
        world_size=world,
        process_group=pg,
        state=addon_state if addon_state is not None else state,
        is_final=is_final,
    )
    addons.hook.on_save_start(ctx=ctx)
    addons.hook.transform_state_dict(ctx=ctx, state_dict=expanded)
    writer = fmt.storage_writer(backend, data_dir, **format_options)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(
                expanded,
                storage_writer=writer,
                planner=SafeSavePlanner(),
                process_group=pg,
                no_dist=not _dist.active(pg),
            )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if rank == 0 and data_dir != final:
            # DCP reports a failure to every rank once all are done writing: drop the staging dir
            try:
                backend.remove(data_dir, recursive=True)
            except Exception as cleanup_exc:  # the next save removes it anyway
                log.warning("could not remove %s: %s", backend.url(data_dir), cleanup_exc)
        raise translate(exc, f"save to {u}") from exc
    t_write = time.perf_counter()
    addons.hook.on_tensors_written(ctx=ctx)
    artifacts: dict[str, dict[str, Any]] = {}
    for part in _dist.all_gather(ctx.artifacts, pg):
        artifacts.update(part)

    def commit() -> Manifest:
        manifest = Manifest(
            format=fmt.name,
            files={**writer.files, **artifacts},
            format_metadata=writer.format_metadata,
            world_size=world,
            step=step,
            metrics=dict(metrics or {}),
            addons=list(addons.names),
            user=dict(user_metadata or {}),
        )
        commit_target(backend, data_dir, final, manifest.to_bytes())
        return manifest

    manifest = _dist.on_coordinator(commit, pg)
    t_commit = time.perf_counter()
    ctx.write_path = final
    ctx.manifest = manifest
    if run_after_commit:
        addons.hook.after_commit(ctx=ctx)
    total = manifest.total_bytes if manifest is not None else writer.bytes_written
    result = SaveResult(
        url=str(u),
        step=step,
        bytes=total,
        seconds=time.perf_counter() - t0,
        timings={"prepare": t_prep - t0, "write": t_write - t_prep, "commit": t_commit - t_write},
        manifest=manifest,
    )
    if rank == 0:
        log.info(
            "saved %s: %.1f MB in %.2fs (%.2f GB/s; prepare %.2fs, write %.2fs, commit %.2fs)",
            u,
            result.bytes / 1e6,
            result.seconds,
            result.gbps,
            *result.timings.values(),
        )
    return result, ctx


# -- load ----------------------------------------------------------------------------------
def find_format(backend: Backend, u: URL, manifest: Manifest | None) -> Any:
    """The format of the checkpoint at ``u``: from its manifest, or detected for foreign ones."""
    if manifest is not None:
        if u.format and u.format != manifest.format:
            log.warning(
                "%s was written in format %r, not %r; loading it as %r",
                u,
                manifest.format,
                u.format,
                manifest.format,
            )
        return get_format(manifest.format)
    candidates = [u.format] if u.format else [n for n in format_names() if n != "native"]
    for name in candidates:
        fmt = get_format(name)
        if fmt.detect(backend, u.path):
            return fmt
    partial = staging_path(backend, u.path)
    if backend.exists(partial) or backend.listdir(u.path):
        raise IncompleteCheckpointError(
            f"{u} has no {MANIFEST_NAME}: the save that wrote it did not finish (or it is not a ckptio checkpoint)"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {u}")


def load_checkpoint(
    state: dict[str, Any],
    url: str | URL,
    *,
    backend: Backend | None = None,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
    addons: AddonSet | None = None,
    storage_options: dict[str, Any] | None = None,
    step: int | None = None,
    **format_options: Any,
) -> LoadResult:
    """Load the checkpoint at ``url`` into ``state`` in place (resharding as needed)."""
    t0 = time.perf_counter()
    u = parse_url(url)
    if backend is None:
        u, backend = open_backend(u, storage_options)
    pg = process_group
    rank, world = _dist.rank_and_size(pg)
    addons = addons or AddonSet()
    manifest = _dist.on_coordinator(lambda: read_manifest(backend, u.path), pg, share_result=True)
    fmt = find_format(backend, u, manifest)
    expanded = expand_state(state, rank)
    ctx = AddonContext(
        op="load",
        url=u,
        backend=backend,
        path=u.path,
        write_path=u.path,
        step=step if step is not None else (manifest.step if manifest else None),
        rank=rank,
        world_size=world,
        process_group=pg,
        state=state,
        manifest=manifest,
    )
    addons.hook.validate_load(ctx=ctx)
    addons.hook.transform_state_dict(ctx=ctx, state_dict=expanded)
    if manifest is None:  # a foreign checkpoint: let the format see where the state wants its tensors
        format_options.setdefault("state_keys", list(expanded))
    reader = fmt.storage_reader(backend, u.path, manifest, verify=verify, **format_options)
    per_rank = [k for k, v in state.items() if isinstance(v, (PerRank, RNGState))]
    planner = SafeLoadPlanner(strict=strict, per_rank_keys=per_rank, rank=rank)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                expanded,
                storage_reader=reader,
                planner=planner,
                process_group=pg,
                no_dist=not _dist.active(pg),
            )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        err = translate(exc, f"load from {u}")
        if isinstance(exc, (OSError, ValueError)) and not isinstance(
            err, CheckpointError
        ):  # pragma: no cover
            err = CorruptCheckpointError(str(exc))
        raise err from exc
    addons.hook.restore_state_dict(ctx=ctx, state_dict=expanded)
    restore_state(state, expanded, rank)
    addons.hook.on_load_end(ctx=ctx)
    nbytes = int(getattr(reader, "bytes_read", 0))
    result = LoadResult(
        url=str(u),
        step=ctx.step,
        bytes=nbytes,
        seconds=time.perf_counter() - t0,
        missing=planner.missing,
        unexpected=planner.unexpected,
        manifest=manifest,
    )
    if rank == 0:
        log.info("loaded %s: %.1f MB in %.2fs (%.2f GB/s)", u, nbytes / 1e6, result.seconds, result.gbps)
    return result
