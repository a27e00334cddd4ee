"""The ``ckptio`` command line: look at, check, copy and prune checkpoints on any storage.

Every subcommand takes ``--json`` (one JSON document on stdout, for scripts), ``-v`` (log INFO
lines, ``-vv`` for DEBUG, on stderr), ``--no-progress`` and storage options for the backend
(``-o key=value``, dotted keys nest: ``-o client_kwargs.endpoint_url=http://...``, or a whole JSON
object with ``--storage-options``). The exit status is part of the interface, see
:data:`EXIT_CODES`.

Subcommands that need optional distributions (``consolidate`` needs ``ckptio-safetensors``,
``demo`` needs the demo module) import them only when they run, so a missing or broken plugin
never breaks the others.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import progress as _progress
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidURLError,
    PluginError,
)
from .logging_utils import cli_logging

EXIT_OK = 0
EXIT_CHECKPOINT = 1
EXIT_USAGE = 2
EXIT_PLUGIN = 3

#: The documented exit statuses (also printed by ``ckptio --help``).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_CHECKPOINT: "checkpoint error: not found, incomplete, damaged (verification failed), "
    "refused (protected step, destination exists), storage failure",
    EXIT_USAGE: "usage error: bad arguments, malformed URL or option",
    EXIT_PLUGIN: "a plugin, backend or format is missing or broken (the message says what to pip install)",
}

EPILOG = (
    "exit status:\n"
    + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    + (
        "\n\nenvironment:\n"
        "  CKPTIO_PLUGINS   comma-separated plugin names to load (unset: all installed; empty: none)\n"
        "  CKPTIO_PROGRESS  0 hides progress bars, 1 shows them even when stderr is not a terminal\n"
        "\nURLs: a path, file:///abs, s3://bucket/key, gs://, az://, msc://profile/key ...; a format rides\n"
        "on the scheme: safetensors+s3://bucket/key. See docs/cli.md."
    )
)


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


# -- output --------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What every subcommand gets besides its own arguments."""

    json: bool
    storage_options: dict[str, Any]
    out: Any  # text stream for results (stdout)
    err: Any  # text stream for messages (stderr)

    def emit(self, data: Any, text: Callable[[], str]) -> None:
        """Print ``data`` as JSON with ``--json``, else the human text."""
        if self.json:
            self.out.write(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
        else:
            body = text()
            if body:
                self.out.write(body if body.endswith("\n") else body + "\n")
        self.out.flush()

    def note(self, message: str) -> None:
        """A remark for a person (stderr, so JSON on stdout stays clean)."""
        self.err.write(message + "\n")
        self.err.flush()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, as ``ls -h`` shows them)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _names(names: Sequence[str], limit: int = 8) -> str:
    """A short comma list for tables (``--json`` has them all)."""
    if not names:
        return "-"
    shown = ",".join(names[:limit])
    return shown + (f",... (+{len(names) - limit})" if len(names) > limit else "")


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


# -- storage options -----------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, objects), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_options(pairs: Sequence[str] | None, blob: str | None) -> dict[str, Any]:
    """Merge ``--storage-options JSON`` with ``-o key=value`` pairs (dotted keys nest)."""
    opts: dict[str, Any] = {}
    if blob:
        try:
            loaded = json.loads(blob)
        except ValueError as exc:
            raise UsageError(f"--storage-options is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UsageError("--storage-options must be a JSON object")
        opts.update(loaded)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-o {pair!r}: expected KEY=VALUE")
        node = opts
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"-o {pair!r}: {part!r} is already set to a non-object value")
            node = child
        node[parts[-1]] = _parse_value(value)
    return opts


# -- locating checkpoints ------------------------------------------------------------------------
@dataclass
class Located:
    """A checkpoint found from a URL the user gave: itself, or the newest step under a root."""

    url: Any  # ckptio.URL
    backend: Any
    manifest: Any  # Manifest | None (None for foreign checkpoints)
    fmt: Any
    via_root: str | None = None  # the manager root it was found under
    step: int | None = None


def _open(url: str, ctx: Ctx) -> tuple[Any, Any]:
    from .checkpoint import open_backend

    return open_backend(url, ctx.storage_options)


def locate(url: str, ctx: Ctx, step: int | None = None) -> Located:
    """The checkpoint at ``url``; for a manager root, its newest committed step (or ``step``)."""
    from .checkpoint import find_format, read_manifest
    from .manager import step_name

    u, backend = _open(url, ctx)
    if step is None:
        m = read_manifest(backend, u.path)
        if m is not None:
            return Located(u, backend, m, find_format(backend, u, m), step=m.step)
    root = _manager_or_none(u, backend, ctx)
    if root is not None:
        mgr, steps = root
        chosen = step if step is not None else mgr.latest_step()
        if chosen is None:
            raise CheckpointNotFoundError(f"{u} holds steps but none is committed: {sorted(steps)}")
        if not steps.get(chosen, False):
            raise CheckpointNotFoundError(f"no committed step {chosen} under {u} (committed: {mgr.steps()})")
        mgr.close()
        su = u.join(step_name(chosen))
        m = read_manifest(backend, su.path)
        return Located(su, backend, m, find_format(backend, su, m), via_root=str(u), step=chosen)
    if step is not None:
        raise CheckpointNotFoundError(f"{u} is not a checkpoint series (no step_* directories)")
    # a foreign checkpoint (e.g. a save_pretrained directory) that a format recognises
    return Located(u, backend, None, find_format(backend, u, None))


def _manager_or_none(u: Any, backend: Any, ctx: Ctx) -> tuple[Any, dict[int, bool]] | None:
    from .manager import CheckpointManager

    mgr = CheckpointManager(str(u), storage_options=ctx.storage_options)
    steps = mgr.all_steps()
    if not steps:
        mgr.close()
        return None
    return mgr, steps


# -- plugins -------------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace, ctx: Ctx) -> int:
    from .plugins import ALLOW_ENV, list_plugins

    infos = list_plugins()
    allow = os.environ.get(ALLOW_ENV)
    rows = []
    for p in infos:
        status = "error" if p.error else f"skipped by {ALLOW_ENV}" if p.skipped else "ok"
        d = p.as_dict()
        d["status"] = status
        rows.append(d)

    def text() -> str:
        table = _table(
            ["PLUGIN", "DISTRIBUTION", "VERSION", "BACKENDS", "FORMATS", "ADDONS", "STATUS"],
            [
                [
                    r["name"],
                    r["distribution"] or "-",
                    r["version"] or "-",
                    _names(r["backends"]),
                    _names(r["formats"]),
                    _names(r["addons"]),
                    r["status"],
                ]
                for r in rows
            ],
        )
        errors = [f"{r['name']}: {r['error']}" for r in rows if r["error"]]
        head = f"{ALLOW_ENV}={allow!r}\n" if allow is not None else ""
        return head + table + ("\n\nload errors:\n  " + "\n  ".join(errors) if errors else "")

    ctx.emit({"allow_list": allow, "plugins": rows}, text)
    if args.check and any(r["error"] for r in rows):
        return EXIT_PLUGIN
    return EXIT_OK


# -- ls ------------------------------------------------------------------------------------------
def _summary(m: Any, url: str) -> dict[str, Any]:
    return {
        "url": url,
        "format": m.format,
        "step": m.step,
        "world_size": m.world_size,
        "files": len(m.files),
        "bytes": m.total_bytes,
        "created": _iso(m.created),
        "metrics": dict(m.metrics),
        "addons": list(m.addons),
        "user": dict(m.user),
    }


def _summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"checkpoint  {s['url']}",
        f"format      {s['format']}",
        f"step        {s['step'] if s['step'] is not None else '-'}",
        f"world size  {s['world_size']}",
        f"files       {s['files']} ({human_bytes(s['bytes'])}, {s['bytes']} bytes)",
        f"created     {s['created']}",
    ]
    if s["metrics"]:
        lines.append(f"metrics     {_metrics_text(s['metrics'])}")
    if s["addons"]:
        lines.append(f"addons      {', '.join(s['addons'])}")
    if s["user"]:
        lines.append(f"metadata    {json.dumps(s['user'], sort_keys=True)}")
    return "\n".join(lines)


def cmd_ls(args: argparse.Namespace, ctx: Ctx) -> int:
    from .checkpoint import find_format, read_manifest

    u, backend = _open(args.url, ctx)
    m = read_manifest(backend, u.path)
    if m is not None:
        s = _summary(m, str(u))
        ctx.emit({"kind": "checkpoint", **s}, lambda: _summary_text(s))
        return EXIT_OK
    root = _manager_or_none(u, backend, ctx)
    if root is None:
        fmt = find_format(backend, u, None)  # raises not found / incomplete
        ctx.emit(
            {"kind": "foreign", "url": str(u), "format": fmt.name},
            lambda: f"{u}: a {fmt.name} checkpoint written by another tool (no manifest)",
        )
        return EXIT_OK
    mgr, all_steps = root
    latest = mgr.latest_step()
    steps = []
    for step, committed in all_steps.items():
        entry: dict[str, Any] = {
            "step": step,
            "url": str(mgr.url_of(step)),
            "committed": committed,
            "latest": step == latest,
        }
        if committed:
            sm = read_manifest(backend, mgr._step_path(step))
            if sm is not None:
                entry.update(
                    format=sm.format,
                    bytes=sm.total_bytes,
                    files=len(sm.files),
                    metrics=dict(sm.metrics),
                    created=_iso(sm.created),
                    world_size=sm.world_size,
                )
        steps.append(entry)
    mgr.close()

    def text() -> str:
        rows = [
            [
                e["step"],
                "yes" if e["committed"] else "NO (incomplete)",
                human_bytes(e["bytes"]) if "bytes" in e else "-",
                e.get("format", "-"),
                e.get("world_size", "-"),
                e.get("created") or "-",
                _metrics_text(e.get("metrics", {})) or "-",
                "latest" if e["latest"] else "",
            ]
            for e in steps
        ]
        return f"{u}\n" + _table(
            ["STEP", "COMMITTED", "SIZE", "FORMAT", "RANKS", "CREATED", "METRICS", ""], rows
        )

    ctx.emit({"kind": "series", "url": str(u), "latest": latest, "steps": steps}, text)
    return EXIT_OK


# -- inspect -------------------------------------------------------------------------------------
def _group_tensors(entries: list[Any]) -> list[dict[str, Any]]:
    """One row per stored name (chunks of a sharded tensor are summed)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        row = out.setdefault(
            e.name,
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bytes": 0, "files": [], "chunks": 0},
        )
        row["bytes"] += int(e.nbytes)
        row["chunks"] += 1
        if e.file not in row["files"]:
            row["files"].append(e.file)
    return sorted(out.values(), key=lambda r: r["name"])


def cmd_inspect(args: argparse.Namespace, ctx: Ctx) -> int:
    loc = locate(args.url, ctx, args.step)
    if loc.via_root:
        ctx.note(f"{loc.via_root} is a checkpoint series; inspecting step {loc.step}")
    tensors = _group_tensors(loc.fmt.tensors(loc.backend, loc.url.path, loc.manifest))
    if args.filter:
        tensors = [t for t in tensors if fnmatch.fnmatchcase(t["name"], args.filter)]
    data: dict[str, Any] = {
        "url": str(loc.url),
        "format": loc.fmt.name,
        "manifest": None,
        "tensors": tensors,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
    }
    if loc.manifest is not None:
        m = loc.manifest
        data["manifest"] = {
            **_summary(m, str(loc.url)),
            "file_list": {name: dict(info) for name, info in sorted(m.files.items())},
            "checksum_scheme": "xxh3_64",
        }
        data["addons"] = list(m.addons)

    def text() -> str:
        parts = []
        if data["manifest"] is not None:
            parts.append(_summary_text(data["manifest"]))
            data_files = {f for t in tensors for f in t["files"]}
            extra = [n for n in sorted(loc.manifest.files) if n not in data_files]
            if extra and not args.filter:
                parts.append("artifacts   " + ", ".join(extra))
        else:
            parts.append(
                f"checkpoint  {loc.url}\nformat      {loc.fmt.name} (no manifest: written by another tool)"
            )
        rows = [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                human_bytes(t["bytes"]),
                ",".join(t["files"]) + (f" ({t['chunks']} chunks)" if t["chunks"] > 1 else ""),
            ]
            for t in tensors
        ]
        parts.append(f"\n{len(tensors)} entries, {human_bytes(data['tensor_bytes'])}")
        if rows:
            parts.append(_table(["NAME", "DTYPE", "SHAPE", "SIZE", "FILE"], rows))
        return "\n".join(parts)

    ctx.emit(data, text)
    return EXIT_OK


# -- verify --------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, ctx: Ctx) -> int:
    from .api import verify
    from .checkpoint import read_manifest

    u, backend = _open(args.url, ctx)
    targets: list[tuple[Any, int]] = []  # (url, expected bytes)
    m = read_manifest(backend, u.path)
    if m is not None:
        targets.append((u, m.total_bytes))
    else:
        root = _manager_or_none(u, backend, ctx)
        if root is None:
            from .checkpoint import find_format

            find_format(backend, u, None)  # raises "not found" / "incomplete" with the right message
            raise CheckpointError(f"{u} has no manifest (written by another tool): nothing to verify against")
        mgr, all_steps = root
        committed = mgr.steps()
        if not committed:
            raise CheckpointNotFoundError(f"no committed step under {u} (incomplete: {sorted(all_steps)})")
        chosen = [committed[-1]] if args.latest else committed
        for s in chosen:
            sm = read_manifest(backend, mgr._step_path(s))
            targets.append((mgr.url_of(s), sm.total_bytes if sm else 0))
        mgr.close()
    results = []
    total = sum(n for _, n in targets)
    with _progress.progress(total, "verify") as bar:
        for tu, nbytes in targets:
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"url": str(tu)}
            try:
                checked = verify(str(tu), storage_options=ctx.storage_options)
                entry.update(ok=True, bytes_checked=checked)
            except PluginError:
                raise
            except CheckpointError as exc:
                entry.update(ok=False, error=str(exc), error_type=type(exc).__name__)
            entry["seconds"] = round(time.perf_counter() - t0, 4)
            results.append(entry)
            bar.update(nbytes)
    ok = all(r["ok"] for r in results)

    def text() -> str:
        lines = []
        for r in results:
            if r["ok"]:
                lines.append(
                    f"OK      {r['url']}  ({human_bytes(r['bytes_checked'])} checked in {r['seconds']:.2f}s)"
                )
            else:
                lines.append(f"FAILED  {r['url']}: {r['error']}")
        return "\n".join(lines)

    ctx.emit({"ok": ok, "results": results}, text)
    return EXIT_OK if ok else EXIT_CHECKPOINT


# -- cp ------------------------------------------------------------------------------------------
_COPY_CHUNK = 8 << 20


def _prepare_destination(backend: Any, path: str, overwrite: bool, url: Any) -> Any:
    """Make room for a new checkpoint at ``path`` through the commit protocol (:mod:`ckptio.commit`):
    a unique staging directory renamed into place at the end on ``rename`` backends, an in-place
    write with ``manifest.json`` last on ``marker`` ones."""
    from .commit import Target

    return Target.prepare(
        backend, path, overwrite=overwrite, what=str(url), hint="pass --overwrite to replace it"
    )


def _copy_one(
    loc: Located, name: str, info: dict[str, Any], dst_backend: Any, data_dir: str, bar: Any
) -> tuple[int, str]:
    """Stream one file; returns (bytes, xxh3-64 of what was written).

    The source's size is compared with the manifest *before* anything is read, and never more
    than that many bytes are copied, so a file that is something else than it claims (a device, a
    file that grows) costs nothing; the checksums are checked on the destination afterwards."""
    import xxhash

    from .errors import CorruptCheckpointError

    src_path = loc.backend.join(loc.url.path, name)
    where = loc.backend.url(src_path)
    size = int(info["size"])
    actual = loc.backend.size(src_path)
    if actual != size:
        raise CorruptCheckpointError(f"{where} has {actual} bytes, its manifest says {size}", path=where)
    digest = xxhash.xxh3_64()
    n = 0
    with (
        loc.backend.open_read(src_path) as r,
        dst_backend.open_write(dst_backend.join(data_dir, name)) as w,
    ):
        while n < size:
            chunk = r.read(min(_COPY_CHUNK, size - n))
            if not chunk:
                break
            w.write(chunk)
            digest.update(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    if n != size:
        raise CorruptCheckpointError(f"{where} has {n} bytes, its manifest says {size}", path=where)
    return n, digest.hexdigest()


def copy_files(loc: Located, dst: Any, dst_backend: Any, overwrite: bool) -> dict[str, Any]:
    """Copy a committed checkpoint file by file (any backend to any backend), manifest last.

    Nothing is decoded, so the layout (ranks, chunks, artifacts) and every checksum stay as they
    are; the copied manifest is byte-identical and still describes the copy. Before the commit,
    the copy is verified against that manifest (sizes and every checksum, as ``ckptio verify``
    does), so a damaged or forged source is never published.
    """
    from .backend import read_limited
    from .errors import CorruptCheckpointError
    from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
    from .plugins import get_format

    mpath = loc.backend.join(loc.url.path, MANIFEST_NAME)
    manifest_bytes = read_limited(loc.backend, mpath, MAX_MANIFEST_BYTES, "manifest")
    m = Manifest.from_bytes(manifest_bytes, loc.backend.url(mpath))  # what is copied is what is checked
    if MANIFEST_NAME in m.files:
        raise CorruptCheckpointError(
            f"{loc.url}: its manifest lists a data file named {MANIFEST_NAME}", path=str(loc.url)
        )
    fmt = get_format(m.format)
    target = _prepare_destination(dst_backend, dst.path, overwrite, dst)
    copied = 0
    try:
        with _progress.progress(m.total_bytes, "cp") as bar:
            for name, info in sorted(m.files.items()):
                n, digest = _copy_one(loc, name, info, dst_backend, target.data_dir, bar)
                expected = info.get("xxh3")
                if expected is not None and digest != expected:
                    where = loc.backend.url(loc.backend.join(loc.url.path, name))
                    raise CorruptCheckpointError(
                        f"checksum mismatch in {where}: the file is damaged", path=where
                    )
                copied += n
        target.check_files(m.files)
        fmt.verify(dst_backend, target.data_dir, m)  # every stored byte, against its checksums
        target.commit(manifest_bytes)
    except BaseException:
        target.abort()
        raise
    return {"mode": "files", "bytes": copied, "files": len(m.files), "format": m.format}


#: Depth of a state-dict path in ``planner_data`` beyond which the metadata is taken as hostile.
_MAX_PATH_DEPTH = 64


def _state_path(fqn: str, raw: Any, n_entries: int, where: str) -> tuple[str | int, ...]:
    """The nesting of ``fqn`` in the original state dict, checked so that hostile metadata cannot
    build huge lists (``["model", 300000000]``) or clash types."""
    from .errors import CorruptCheckpointError

    if raw is None:
        return (fqn,)
    ok = (
        isinstance(raw, (list, tuple))
        and 0 < len(raw) <= _MAX_PATH_DEPTH
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


def _available_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def destination_state(loc: Located) -> dict[str, Any]:
    """A state dict of empty CPU tensors (and ``None`` for plain values) shaped like the source.

    Built from the DCP metadata the source's reader exposes, which every format provides: the
    global shape and dtype of each tensor (so a sharded source comes out whole) and, through
    ``planner_data``, the nesting of the original state dict (``{"model": {"w": ...}}`` stays nested).
    Hostile metadata (paths that would build huge lists, tensors larger than this machine's
    memory) is refused with a ckptio error before anything is allocated.
    """
    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .errors import CorruptCheckpointError

    where = str(loc.url)
    reader = loc.fmt.storage_reader(loc.backend, loc.url.path, loc.manifest)
    md = reader.read_metadata()
    mapping = md.planner_data if isinstance(md.planner_data, dict) else {}
    n_entries = len(md.state_dict_metadata)
    need = 0
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            sizes = tuple(meta.size)
            if any(not isinstance(s, int) or s < 0 for s in sizes):
                raise CorruptCheckpointError(
                    f"{where}: tensor {fqn!r} has an invalid shape {sizes}", path=where
                )
            need += math.prod(sizes) * meta.properties.dtype.itemsize
    memory = _available_memory()
    if memory is not None and need > memory:
        raise CheckpointError(
            f"{where}: its tensors take {human_bytes(need)} in full, more than this machine's "
            f"{human_bytes(memory)} of memory (cp --full and conversions hold the whole checkpoint)"
        )
    state: dict[str, Any] = {}
    for fqn, meta in md.state_dict_metadata.items():
        path = _state_path(fqn, mapping.get(fqn), n_entries, where)
        try:
            value = (
                torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                if isinstance(meta, TensorStorageMetadata)
                else None
            )
            set_element(state, path, value)  # type: ignore[arg-type]
        except (RuntimeError, MemoryError) as exc:
            raise CheckpointError(f"{where}: cannot allocate tensor {fqn!r}: {exc}") from exc
        except (TypeError, IndexError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"{where}: the state-dict paths of its metadata clash at {fqn!r} ({exc})", path=where
            ) from exc
    return state


class _CarryArtifacts:
    """Addon used by ``cp``: re-writes the source's non-tensor files (e.g. ``adapter_config.json``)."""

    name = "cp"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def on_tensors_written(self, ctx: Any) -> None:
        if ctx.is_coordinator:
            for name, data in self.files.items():
                ctx.write_bytes(name, data)


def _read_artifact(loc: Located, name: str, info: dict[str, Any]) -> bytes:
    """A non-tensor file of the source, its size checked before it is read, its checksum after."""
    import xxhash

    from .backend import read_limited
    from .errors import CorruptCheckpointError

    path = loc.backend.join(loc.url.path, name)
    where = loc.backend.url(path)
    data = read_limited(loc.backend, path, int(info["size"]), "file")
    expected = info.get("xxh3")
    if len(data) != info["size"] or (expected is not None and xxhash.xxh3_64_hexdigest(data) != expected):
        raise CorruptCheckpointError(f"checksum mismatch in {where}: the file is damaged", path=where)
    return data


def copy_convert(
    loc: Located, dst: Any, dst_backend: Any, fmt_name: str, overwrite: bool, ctx: Ctx
) -> dict[str, Any]:
    """Read the whole source into CPU memory and save it anew: any format to any format, one rank."""
    from .addons import AddonSet
    from .checkpoint import load_checkpoint, save_checkpoint

    state = destination_state(loc)
    src_bytes = loc.manifest.total_bytes if loc.manifest is not None else None
    artifacts: dict[str, bytes] = {}
    if loc.manifest is not None:
        data_files = {e.file for e in loc.fmt.tensors(loc.backend, loc.url.path, loc.manifest)}
        if data_files:
            for name in sorted(set(loc.manifest.files) - data_files):
                if name.endswith(".index.json"):  # describes data files; the new format writes its own
                    continue
                artifacts[name] = _read_artifact(loc, name, loc.manifest.files[name])
        elif loc.manifest.files:
            ctx.note(
                f"format {loc.fmt.name!r} does not list its tensor files; extra files are not carried over"
            )
    from .commit import check_replaceable

    # refused before the whole source is read (the save below checks again, atomically)
    check_replaceable(
        dst_backend, dst.path, overwrite=overwrite, what=str(dst), hint="pass --overwrite to replace it"
    )
    with _progress.progress(2, "cp (read, write)", unit="step") as bar:
        loaded = load_checkpoint(state, loc.url, backend=loc.backend)
        bar.update(1)
        m = loc.manifest
        result, _ = save_checkpoint(
            state,
            dst,
            backend=dst_backend,
            format=fmt_name,
            addons=AddonSet([_CarryArtifacts(artifacts)]),
            step=m.step if m else None,
            metrics=dict(m.metrics) if m else None,
            user_metadata=dict(m.user) if m else None,
            overwrite=overwrite,
        )
        bar.update(1)
    return {
        "mode": "convert",
        "bytes": result.bytes,
        "bytes_read": loaded.bytes or src_bytes,
        "format": fmt_name,
        "artifacts": sorted(artifacts),
        "seconds": round(result.seconds + loaded.seconds, 4),
    }


def cmd_cp(args: argparse.Namespace, ctx: Ctx) -> int:
    from .checkpoint import open_backend
    from .plugins import get_format
    from .url import parse_url

    loc = locate(args.src, ctx, args.step)
    if loc.via_root:
        ctx.note(f"{loc.via_root} is a checkpoint series; copying step {loc.step}")
    dst = parse_url(args.dst)
    dst_opts = {**ctx.storage_options, **parse_storage_options(args.dst_option, args.dst_storage_options)}
    dst, dst_backend = open_backend(dst, dst_opts)
    src_fmt = loc.manifest.format if loc.manifest is not None else loc.fmt.name
    fmt_name = args.format or dst.format or src_fmt
    get_format(fmt_name)  # a missing format is exit 3 before anything is written
    if str(dst.storage_url) == str(loc.url.storage_url):
        raise UsageError("source and destination are the same location")
    t0 = time.perf_counter()
    try:
        if fmt_name == src_fmt and loc.manifest is not None and not args.full:
            info = copy_files(loc, dst, dst_backend, args.overwrite)
        else:
            info = copy_convert(loc, dst, dst_backend, fmt_name, args.overwrite, ctx)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
        # hostile or damaged metadata that slipped past the format's checks: still a ckptio error
        raise CheckpointError(f"cannot copy {loc.url}: {type(exc).__name__}: {exc}") from exc
    finally:
        dst_backend.close()
    seconds = time.perf_counter() - t0
    data = {"src": str(loc.url), "dst": str(dst.with_format(None)), **info, "seconds": round(seconds, 4)}

    def text() -> str:
        how = "copied" if info["mode"] == "files" else f"converted to {fmt_name}"
        rate = info["bytes"] / seconds / 1e9 if seconds > 0 else 0.0
        return f"{how}: {loc.url} -> {data['dst']} ({human_bytes(info['bytes'])} in {seconds:.2f}s, {rate:.2f} GB/s)"

    ctx.emit(data, text)
    return EXIT_OK


# -- rm ------------------------------------------------------------------------------------------
def _locked_hint(exc: CheckpointError) -> CheckpointError:
    from .errors import RunLockedError

    return RunLockedError(f"rm deleted nothing more: {exc}", holder=getattr(exc, "holder", None))


def cmd_rm(args: argparse.Namespace, ctx: Ctx) -> int:
    from .commit import remove_leftovers
    from .errors import RunLockedError
    from .manager import LATEST_NAME, CheckpointManager, step_name

    mgr = CheckpointManager(args.url, storage_options=ctx.storage_options, takeover=args.takeover)
    deleted: list[int] = []
    remaining: list[int] = []
    busy: list[dict[str, Any]] = []
    try:
        backend, root = mgr.backend, mgr.root.path
        all_steps = mgr.all_steps()  # committed or not, leftovers included
        known = set(all_steps)
        if not known:
            raise CheckpointNotFoundError(f"{mgr.root} holds no steps")
        unknown = [s for s in args.steps if s not in known]
        if unknown:
            raise CheckpointNotFoundError(
                f"no step {', '.join(map(str, unknown))} under {mgr.root} "
                f"(steps: {', '.join(map(str, sorted(known)))})"
            )
        protected = mgr.protected_steps()
        refused = [s for s in args.steps if s in protected and all_steps.get(s)]
        if refused and not args.force:
            raise CheckpointError(
                f"step {', '.join(map(str, refused))} is the newest committed step, which retention protects; "
                "pass --force to delete it anyway"
            )
        committed_deleted = False
        for s in dict.fromkeys(args.steps):
            removed = False
            if all_steps.get(s):
                try:
                    mgr.delete(s, force=args.force)  # takes the run lock
                except RunLockedError as exc:
                    raise _locked_hint(exc) from exc
                removed = committed_deleted = True
            elif backend.exists(backend.join(root, step_name(s))):
                # a step directory without its manifest: never committed (or half deleted)
                backend.remove(backend.join(root, step_name(s)), recursive=True)
                removed = True
            n_removed, live = remove_leftovers(backend, backend.join(root, step_name(s)))
            busy += [
                {"step": s, "token": token, "holder": f"{body.get('host', '?')}/{body.get('pid', '?')}"}
                for token, body in live.items()
            ]
            if removed or n_removed:
                deleted.append(s)
        remaining = mgr.steps()
        pointer = backend.join(root, LATEST_NAME)
        if committed_deleted:  # keep the `latest` pointer truthful (this process holds the run lock)
            latest = mgr.latest_step()  # the newest step holding its manifest; the pointer is a hint
            if latest is None:
                if backend.exists(pointer):
                    backend.remove(pointer)
            elif _pointer_text(backend, pointer).strip() != step_name(latest):
                backend.write_bytes(pointer, (step_name(latest) + "\n").encode())
    finally:
        mgr.close()
    for b in busy:
        ctx.note(f"step {b['step']}: a save is being written by {b['holder']}; its files were left alone")

    def text() -> str:
        lines = [f"deleted step {s}" for s in deleted]
        lines += [f"step {b['step']}: being written by {b['holder']}, left alone" for b in busy]
        return "\n".join(lines) + f"\nremaining: {remaining or 'none'}"

    ctx.emit({"url": str(mgr.root), "deleted": deleted, "remaining": remaining, "busy": busy}, text)
    return EXIT_OK


def _pointer_text(backend: Any, pointer: str) -> str:
    from .backend import read_limited

    try:
        return read_limited(backend, pointer, 64, "latest pointer").decode("utf-8", "replace")
    except CheckpointError:
        return ""


# -- consolidate and demo (optional modules, imported only when used) ----------------------------
def _consolidate_module() -> Any:
    import importlib

    try:
        return importlib.import_module("ckptio_safetensors.cli")
    except ImportError as exc:
        try:
            importlib.import_module("ckptio_safetensors")
        except ImportError:
            raise PluginError(
                "ckptio consolidate needs the safetensors plugin: pip install ckptio-safetensors"
            ) from exc
        raise PluginError(
            f"ckptio-safetensors is installed but its command line failed to import: {exc}"
        ) from exc


def _demo_module() -> Any:
    import importlib

    try:
        return importlib.import_module("ckptio.demo")
    except Exception as exc:
        raise PluginError(f"the demo failed to import: {type(exc).__name__}: {exc}") from exc


def cmd_consolidate(args: argparse.Namespace, ctx: Ctx) -> int:
    mod = getattr(args, "_module", None) or _consolidate_module()
    # hand the parsed backend options over (the plugin's own parser has no storage options)
    args.storage_options = ctx.storage_options or None
    return int(mod.run_consolidate(args))


def cmd_demo(args: argparse.Namespace, ctx: Ctx) -> int:
    mod = getattr(args, "_module", None) or _demo_module()
    return int(mod.run(args))


# -- parser --------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log INFO lines (-vv: DEBUG) on stderr")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (also CKPTIO_PROGRESS=0)")
    g.add_argument(
        "-o",
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="backend option; dotted keys nest (client_kwargs.endpoint_url=http://...); values are JSON if they parse",
    )
    g.add_argument(
        "--storage-options", metavar="JSON", default=None, help="backend options as one JSON object"
    )
    return p


def _subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _optional_parser(
    sub: Any,
    name: str,
    common: argparse.ArgumentParser,
    loader: Callable[[], Any],
    adder: str,
    wanted: bool,
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subparser whose arguments come from an optional module, imported only when ``wanted``."""
    p = sub.add_parser(
        name,
        parents=[common],
        help=help_text,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    module = None
    load_error: PluginError | None = None
    if wanted:
        try:
            module = loader()
            getattr(module, adder)(p)
        except PluginError as exc:
            load_error = exc
        except Exception as exc:  # a broken optional module becomes exit 3, never a crash
            load_error = PluginError(f"{name}: {type(exc).__name__}: {exc}")
    if module is None:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(_module=module, _load_error=load_error)
    return p


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. ``argv`` decides whether optional subcommand modules get imported."""
    from . import __version__

    common = _common()
    parser = argparse.ArgumentParser(
        prog="ckptio",
        description="Look at, verify, copy, convert and prune ckptio checkpoints on any storage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace, Ctx], int], help_text: str, desc: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=desc,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(_fn=fn)
        return p

    p = add(
        "plugins",
        cmd_plugins,
        "list installed plugins and what they provide",
        "List every ckptio plugin found through the 'ckptio' entry-point group: distribution, version, "
        "the backends/formats/addons it registers, and load errors or CKPTIO_PLUGINS skips.",
    )
    p.add_argument("--check", action="store_true", help="exit 3 if any plugin failed to load")

    p = add(
        "ls",
        cmd_ls,
        "list the steps of a series, or summarise one checkpoint",
        "For a CheckpointManager root: every step, committed or not, its size, metrics, and which is "
        "latest. For a single checkpoint: its manifest summary.",
    )
    p.add_argument("url")

    p = add(
        "inspect",
        cmd_inspect,
        "show tensors, metadata and addons of a checkpoint",
        "Tensors (name, dtype, shape, bytes, file), manifest fields and addons. A series root shows its "
        "newest committed step (or --step).",
    )
    p.add_argument("url")
    p.add_argument("--step", type=int, default=None, help="a step of a series root (default: latest)")
    p.add_argument(
        "--filter", metavar="GLOB", default=None, help="only tensor names matching GLOB (e.g. 'model.*')"
    )

    p = add(
        "verify",
        cmd_verify,
        "re-read and check every byte against the manifest",
        "Check sizes and checksums of every file of a checkpoint. For a series root, check every "
        "committed step (or only the newest with --latest). Exit 1 if anything is damaged.",
    )
    p.add_argument("url")
    p.add_argument("--latest", action="store_true", help="for a series root: only the newest committed step")

    p = add(
        "cp",
        cmd_cp,
        "copy or convert a checkpoint between URLs and formats",
        "Copy SRC to DST. With the same format, files are copied as they are (layout and checksums "
        "kept; every checksum is verified before the copy is published). With another format (--format "
        "or a 'fmt+' prefix on DST) or --full, the checkpoint is "
        "loaded into CPU memory as full, unsharded tensors and saved anew, so it needs RAM for the "
        "whole checkpoint. A series root as SRC copies its newest committed step (or --step).",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--format", default=None, help="destination format (default: DST's prefix, else the source's)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="re-save as one full (unsharded) checkpoint even if the format is unchanged",
    )
    p.add_argument("--step", type=int, default=None, help="a step of a series root (default: latest)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a committed checkpoint at DST (a directory that is not a checkpoint is never replaced)",
    )
    p.add_argument(
        "--dst-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="backend option for DST only (like -o)",
    )
    p.add_argument("--dst-storage-options", metavar="JSON", default=None, help="backend options for DST only")

    p = add(
        "rm",
        cmd_rm,
        "delete steps of a series",
        "Delete steps under a CheckpointManager root. The newest committed step is protected (as "
        "retention protects it) unless --force. Leftovers of interrupted saves of a step go too; a "
        "save still running (live lease) is left alone. Refused while another live process holds "
        "the run lock, unless --takeover.",
    )
    p.add_argument("url")
    p.add_argument("steps", nargs="+", type=int, metavar="STEP")
    p.add_argument("--force", action="store_true", help="also delete the newest committed step")
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take the run lock over from the process holding it (only once you know that job is gone)",
    )

    command = _subcommand(argv)
    p = _optional_parser(
        sub,
        "consolidate",
        common,
        _consolidate_module,
        "add_consolidate_arguments",
        command == "consolidate",
        "merge a checkpoint into HF safetensors shards (needs ckptio-safetensors)",
        "Write a checkpoint as model-0000i-of-0000N.safetensors + model.safetensors.index.json, loadable by "
        "transformers. Provided by ckptio-safetensors; run 'ckptio consolidate --help' to see its options.",
    )
    p.set_defaults(_fn=cmd_consolidate)
    p = _optional_parser(
        sub,
        "demo",
        common,
        _demo_module,
        "add_arguments",
        command == "demo",
        "run the end-to-end demo",
        "A short end-to-end demonstration of ckptio on this machine (make demo).",
    )
    p.set_defaults(_fn=cmd_demo)
    return parser


def _exit_for(exc: BaseException) -> int:
    if isinstance(exc, PluginError):
        return EXIT_PLUGIN
    if isinstance(exc, (InvalidURLError, UsageError)):
        return EXIT_USAGE
    return EXIT_CHECKPOINT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    want_json = bool(args.json)
    ctx = Ctx(json=want_json, storage_options={}, out=sys.stdout, err=sys.stderr)
    _progress.set_enabled(False if args.no_progress else None)
    try:
        with cli_logging(args.verbose):
            load_error = getattr(args, "_load_error", None)
            if load_error is not None:
                raise load_error
            ctx.storage_options = parse_storage_options(args.storage_option, args.storage_options)
            return int(args._fn(args, ctx))
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return 130
    except (CheckpointError, UsageError, OSError) as exc:
        code = _exit_for(exc)
        if want_json:
            ctx.emit({"error": str(exc), "error_type": type(exc).__name__, "exit_code": code}, lambda: "")
        ctx.note(f"ckptio {args.command}: error: {exc}")
        return code
    finally:
        _progress.set_enabled(None)


def run() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
