"""Save and load one checkpoint: plan with DCP, write through a format, commit through the backend.

The commit protocol, the same for every format:

1. The coordinator prepares the target. ``rename`` backends write into a hidden staging
   directory ``.<name>.<token>.ckptio-partial`` beside the target; ``marker`` backends (object
   stores) write in place, into files named with the save's token, after removing any old
   ``manifest.json`` (the marker) first.
2. Every rank writes its data (DCP plans, the format writes files through the backend, durably).
3. The coordinator writes ``manifest.json`` last: the list of files with sizes and checksums,
   the format's metadata and the step's metrics. On ``rename`` backends the staging directory is
   then renamed over the target (the old one is moved aside first and removed after).

A checkpoint without a valid manifest does not exist for loading, listing or retention, so a crash
at any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.stateful import Stateful

from . import _dist
from .addons import AddonContext, AddonSet
from .backend import Backend, read_limited
from .commit import Target, parse_leftover, recover, split_parent
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PluginError,
    StateMismatchError,
    translate,
)
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from .options import build_options, check_options, option_names
from .planner import WRAPPED, SafeLoadPlanner, SafeSavePlanner
from .plugins import backend_factory, format_names, get_format
from .state import PerRank, RNGState
from .url import URL, parse_url

log = logging.getLogger("ckptio")


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
        backend = factory(u, **(storage_options or {}))
    except CheckpointError:
        raise
    except Exception as exc:  # a backend's client library refusing its options (bad credentials...)
        raise translate(exc, f"opening the {u.scheme}:// backend for {u}") from exc
    # the user's own symlinks in the URL are followed here, once; below it nothing is followed
    resolved = backend.resolve(u.path)
    return (u if resolved == u.path else dataclasses.replace(u, path=resolved)), backend


def run_dcp_save(expanded: dict[str, Any], writer: Any, pg: Any, what: Any) -> None:
    """``dcp.save`` of an expanded state through ``writer``, with ckptio's planner; DCP's
    failures (a ``BaseException`` subclass) become ckptio errors naming ``what``."""
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
        raise translate(exc, f"save to {what}") from exc


def read_manifest_bytes(backend: Backend, path: str) -> bytes | None:
    """The bytes of the manifest at ``path``, ``None`` when there is none.

    The size is checked before reading (:func:`~ckptio.backend.read_limited`), so a huge sparse
    file or a device planted as ``manifest.json`` is refused without being read.
    """
    try:
        return read_limited(backend, backend.join(path, MANIFEST_NAME), MAX_MANIFEST_BYTES, "manifest")
    except (CheckpointNotFoundError, FileNotFoundError):
        return None


def manifest_digest(data: bytes) -> str:
    """The xxh3-64 of a manifest's bytes: what tells one save's manifest from another's (a load
    compares it before and after reading; the tiered manager compares copies across tiers and
    nodes)."""
    return xxhash.xxh3_64_hexdigest(data)


def read_manifest(backend: Backend, path: str) -> Manifest | None:
    """The manifest at ``path``, ``None`` when there is none; damaged ones raise
    (read by :func:`read_manifest_bytes`)."""
    data = read_manifest_bytes(backend, path)
    if data is None:
        return None
    manifest = Manifest.from_bytes(data, backend.url(backend.join(path, MANIFEST_NAME)))
    manifest.source_digest = manifest_digest(data)  # type: ignore[attr-defined]
    return manifest


# -- state expansion -------------------------------------------------------------------------
def expand_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Replace ``Stateful`` values by their state dicts and ``PerRank`` values by ``{rank<N>: v}``."""
    if not isinstance(state, dict):
        raise CheckpointError(f"state must be a dict, got {type(state).__name__}")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):  # the common case first: the Stateful check is slow (a Protocol)
            out[key] = value
        elif isinstance(value, RNGState):
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
        if isinstance(value, torch.Tensor):
            state[key] = loaded
        elif isinstance(value, RNGState):
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


# -- options -------------------------------------------------------------------------------
def build_format_options(fmt: Any, op: Literal["save", "load"], given: Mapping[str, Any] | None) -> Any:
    """``fmt``'s options for ``op`` from the user's keywords: an instance of its declared
    :attr:`~ckptio.Format.save_options` or ``load_options``; an undeclared name raises
    :class:`~ckptio.OptionError` naming the format and the closest declared option."""
    cls = fmt.save_options if op == "save" else fmt.load_options
    return build_options(cls, given, f"the {fmt.name} format ({op})")


def check_call_options(
    given: Mapping[str, Any],
    own: Iterable[str],
    op: Literal["save", "load"],
    fmt_name: str | None,
    where: str,
) -> None:
    """Refuse, before any I/O, a keyword that neither the call (``own``) nor the format declares.

    Without ``fmt_name`` (a load: the manifest tells the format) the options of every installed
    format are accepted here; the format's own are checked once it is known."""
    if not given:
        return
    valid, deprecated = set(own), set()
    for name in [fmt_name] if fmt_name else format_names():
        try:
            fmt = get_format(name)
        except PluginError:
            if fmt_name:
                raise
            continue  # a broken plugin is reported by ``ckptio plugins``; it declares nothing here
        cls = fmt.save_options if op == "save" else fmt.load_options
        valid.update(option_names(cls))
        deprecated.update(option_names(cls, deprecated=True))
    check_options(given, valid, where, deprecated=deprecated)


# -- save ----------------------------------------------------------------------------------
_MAX_METADATA_DEPTH = 64


def check_metrics(metrics: Any) -> dict[str, float | str]:
    """Validate step metrics before anything is written; return them in manifest form.

    Accepts Python and numpy numbers and 0-d tensors. NaN and infinities are kept (a diverged run
    is worth recording) as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, which survive JSON and
    which :class:`~ckptio.KeepBest` skips.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise StateMismatchError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out: dict[str, float | str] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise StateMismatchError(f"metric names must be strings, got {name!r}")
        if hasattr(value, "item") and getattr(value, "ndim", getattr(value, "dim", lambda: 0)) in (0, ()):
            value = value.item()  # 0-d tensor or numpy scalar
        elif hasattr(value, "item") and callable(getattr(value, "numel", None)) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StateMismatchError(
                f"metric {name!r} is {type(value).__name__}, not a number; pass float(value)"
            )
        f = float(value)
        out[name] = f if math.isfinite(f) else ("nan" if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    return out


def decode_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as stored in a manifest, back to floats (``"nan"`` -> ``float("nan")``)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif value in ("nan", "inf", "-inf"):
            out[name] = float(value)
    return out


def check_metadata(metadata: Any) -> dict[str, Any]:
    """``metadata=`` must be a JSON object of bounded depth; checked before any data is written."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise StateMismatchError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")

    def depth(x: Any, d: int) -> None:
        if d > _MAX_METADATA_DEPTH:
            raise StateMismatchError(f"metadata is nested deeper than {_MAX_METADATA_DEPTH} levels")
        if isinstance(x, dict):
            for v in x.values():
                depth(v, d + 1)
        elif isinstance(x, list):
            for v in x:
                depth(v, d + 1)

    depth(metadata, 0)
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateMismatchError(
            f"metadata must hold JSON values only (str, finite numbers, bools, None, lists, dicts): {exc}"
        ) from exc
    return dict(metadata)


def commit_manifest(target: Target, manifest: Manifest) -> None:
    """The coordinator's last step of a save (also :mod:`ckptio.dcp`'s): check that every file
    the manifest lists is in ``target``'s staging location with its size, then write
    ``manifest.json`` last and publish. Any failure aborts ``target``: nothing is published."""
    try:
        data = manifest.to_bytes()
        target.check_files(manifest.files)
    except BaseException:
        target.abort()
        raise
    target.commit(data)


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
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = True,
    final: bool = False,
    run_after_commit: bool = True,
    addon_state: dict[str, Any] | None = None,
    format_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> tuple[SaveResult, AddonContext]:
    """The full save protocol (see the module docstring). Returns the result and the addon
    context (the manager runs ``after_commit`` itself when saving in the background).

    ``format_options`` are the user's options for the format (its :attr:`~ckptio.Format.save_options`),
    ``progress`` the core's own switch for progress bars (``False`` for background saves).

    A ``backend`` passed in comes with its URL from :func:`open_backend`, which resolved the
    user's own symlinks once; nothing below that URL is resolved again, so a symlink planted as
    a manager's ``step_N`` never leads a save elsewhere."""
    t0 = time.perf_counter()
    u = parse_url(url)
    fmt = get_format(format or u.format or "native")
    # everything a user can get wrong is refused before a byte is written (or a backend opened)
    fopts = build_format_options(fmt, "save", format_options)
    stored_metrics = check_metrics(metrics)
    stored_metadata = check_metadata(metadata)
    if backend is None:
        u, backend = open_backend(u, storage_options)
    pg = process_group
    rank, world = _dist.rank_and_size(pg)
    addons = addons or AddonSet()
    dest = u.path

    target: Target | None = None  # the coordinator's publication; other ranks only write

    def prepare() -> str:
        nonlocal target
        target = Target.prepare(backend, dest, overwrite=overwrite, what=str(u))
        return target.data_dir

    data_dir: str = _dist.on_coordinator(prepare, pg, share_result=True)  # type: ignore[assignment]
    t_prep = time.perf_counter()

    try:
        expanded = expand_state(state, rank)
        ctx = AddonContext(
            op="save",
            url=u,
            backend=backend,
            path=dest,
            write_path=data_dir,
            step=step,
            rank=rank,
            world_size=world,
            process_group=pg,
            state=addon_state if addon_state is not None else state,
            final=final,
        )
        addons.hook.on_save_start(ctx=ctx)
        addons.hook.transform_state_dict(ctx=ctx, state_dict=expanded)
        writer = fmt.storage_writer(backend, data_dir, fopts, progress=progress)
        if target is not None and backend.commit_mode != "rename" and hasattr(writer, "save_token"):
            writer.save_token = target.token  # the coordinator plans, so the token reaches every rank
        run_dcp_save(expanded, writer, pg, u)
        t_write = time.perf_counter()
        addons.hook.on_tensors_written(ctx=ctx)
        artifacts: dict[str, dict[str, Any]] = {}
        for part in _dist.all_gather(ctx.artifacts, pg):
            artifacts.update(part)
    except BaseException:
        if target is not None:  # DCP reports a failure to every rank once all are done writing
            target.abort()
        raise

    def commit() -> Manifest:
        assert target is not None
        manifest = Manifest(
            format=fmt.name,
            files={**writer.files, **artifacts},
            format_metadata=writer.format_metadata,
            world_size=world,
            step=step,
            metrics=stored_metrics,  # type: ignore[arg-type]
            addons=list(addons.names),
            metadata=stored_metadata,
        )
        commit_manifest(target, manifest)
        return manifest

    manifest = _dist.on_coordinator(commit, pg)
    t_commit = time.perf_counter()
    ctx.write_path = dest
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
def find_format(backend: Backend, u: URL, manifest: Manifest | None, path: str | None = None) -> Any:
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
    path = u.path if path is None else path
    candidates = [u.format] if u.format else [n for n in format_names() if n != "native"]
    for name in candidates:
        fmt = get_format(name)
        if fmt.detect(backend, path):
            return fmt
    parent, name = split_parent(path)
    staged = any((p := parse_leftover(e)) and p[0] == name for e in backend.listdir(parent))
    entries = backend.listdir(path)
    if staged or entries:
        shown = ", ".join(sorted(entries)[:8]) + (
            f", ... ({len(entries)} entries)" if len(entries) > 8 else ""
        )
        raise IncompleteCheckpointError(
            f"{u} has no {MANIFEST_NAME}: the save that wrote it did not finish, or it is neither a ckptio "
            "checkpoint nor a Hugging Face directory (*.safetensors, model.safetensors.index.json); "
            + (
                f"it holds: {shown}"
                if entries
                else "an interrupted save left its staging directory beside it"
            )
            + (
                " (pickle weights such as pytorch_model.bin are never loaded: convert them to safetensors)"
                if any(e.endswith((".bin", ".pt", ".pth", ".ckpt")) for e in entries)
                else ""
            )
        )
    raise CheckpointNotFoundError(f"no checkpoint at {u}")


def _replaced(backend: Backend, path: str, manifest: Manifest, pg: Any) -> bool:
    """Whether the checkpoint at ``path`` is no longer the one whose manifest the load started with."""

    return bool(
        _dist.on_coordinator(lambda: manifest_changed(backend, path, manifest), pg, share_result=True)
    )


def replaced_error(u: URL) -> ConcurrentWriteError:
    """The error of a load whose checkpoint another save replaced meanwhile: what was read may
    mix two saves, so it is never returned, and loading again gives one whole save."""
    return ConcurrentWriteError(f"{u} was replaced by another save while it was being loaded; load it again")


def manifest_changed(backend: Backend, path: str, manifest: Manifest) -> bool:
    """Whether the manifest at ``path`` is no longer ``manifest`` (or can no longer be read): the
    checkpoint was replaced or removed since ``manifest`` was read from it.

    Compares the manifest's bytes, not its parse: a second parse of a large one costs seconds."""
    try:
        data = read_limited(backend, backend.join(path, MANIFEST_NAME), MAX_MANIFEST_BYTES, "manifest")
    except CheckpointError:
        return True
    return manifest_digest(data) != getattr(manifest, "source_digest", None)


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
    format_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Load the checkpoint at ``url`` into ``state`` in place (resharding as needed).

    ``format_options`` are the user's options for the format (its :attr:`~ckptio.Format.load_options`),
    checked once the format is known, before any data is read.

    Two optional hooks let a format fit a checkpoint to the state: ``fmt.prepare_load(state,
    backend=, path=, manifest=, options=, process_group=)`` runs before the state's models give
    their state dicts (safetensors materialises meta-device models there), and
    ``reader.bind_state(state, expanded)`` before DCP plans (names, dtypes, tied weights)."""
    t0 = time.perf_counter()
    u = parse_url(url)
    if u.format:  # the format is named: its options are checked before the backend is opened
        build_format_options(get_format(u.format), "load", format_options)
    if backend is None:
        u, backend = open_backend(u, storage_options)
    pg = process_group
    rank, world = _dist.rank_and_size(pg)
    addons = addons or AddonSet()
    path = u.path

    def touch() -> Manifest | None:
        try:  # an interrupted replacement of this URL is finished before reading it
            recover(backend, path)
        except CheckpointError as exc:  # read-only storage: load what is there
            log.warning("could not check %s for an interrupted save: %s", u, exc)
        return read_manifest(backend, path)

    manifest = _dist.on_coordinator(touch, pg, share_result=True)
    fmt = find_format(backend, u, manifest, path)
    fopts = build_format_options(fmt, "load", format_options)
    prepare = getattr(fmt, "prepare_load", None)
    if prepare is not None:  # a format may ready the models first (safetensors: meta-device models, dtypes)
        prepare(state, backend=backend, path=path, manifest=manifest, options=fopts, process_group=pg)
    expanded = expand_state(state, rank)
    ctx = AddonContext(
        op="load",
        url=u,
        backend=backend,
        path=path,
        write_path=path,
        step=step if step is not None else (manifest.step if manifest else None),
        rank=rank,
        world_size=world,
        process_group=pg,
        state=state,
        manifest=manifest,
    )
    addons.hook.validate_load(ctx=ctx)
    addons.hook.transform_state_dict(ctx=ctx, state_dict=expanded)
    try:
        # the state's keys let a format place a foreign checkpoint's tensors (safetensors' prefix)
        reader = fmt.storage_reader(
            backend, path, manifest, fopts, verify=verify, progress=progress, state_keys=list(expanded)
        )
        bind = getattr(reader, "bind_state", None)
        if bind is not None:  # the reader sees the destinations before DCP plans
            bind(state, expanded)
    except CheckpointError as exc:  # per rank, so no collective here
        if manifest is not None and manifest_changed(backend, path, manifest):
            raise replaced_error(u) from exc
        raise
    per_rank = [k for k, v in state.items() if isinstance(v, (PerRank, RNGState))]
    planner = SafeLoadPlanner(strict=strict, per_rank_keys=per_rank, rank=rank)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                {WRAPPED: expanded},  # one key for DCP's per-key Stateful checks (see the planner)
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
        if manifest is not None and _replaced(backend, path, manifest, pg):
            raise replaced_error(u) from exc
        raise err from exc
    if manifest is not None and _replaced(backend, path, manifest, pg):
        # with verify=False a mix of two saves would otherwise go unnoticed
        raise replaced_error(u)
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
