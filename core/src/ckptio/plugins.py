"""Plugin discovery and the registries of backends, formats and addons.

Entry points of the ``ckptio`` group are loaded one at a time: a plugin that fails to import or
to register is recorded (see ``ckptio plugins``) and reported as a warning, never fatal to the
host. ``CKPTIO_PLUGINS`` (comma-separated entry-point names) allow-lists which installed plugins
load; set it to the empty string to load none (the core's built-in ``native`` format always
loads). Code that is not packaged registers at runtime
with :func:`register_backend`, :func:`register_format` and :func:`register_addon` (or with
:func:`register_plugin` for a module or object of hook implementations): the same code path the
entry points take.

Discovery is cached per user (:data:`CACHE_ENV`): scanning every installed distribution's metadata
for entry points, importing each plugin module and running its hooks costs tens of milliseconds per
process (at 16 ranks a machine, inside every first save). The first process records what each
plugin registered (its lazy ``"module:Name"`` targets) in ``~/.cache/ckptio`` (``$XDG_CACHE_HOME``),
keyed on the interpreter and ``sys.path``; later processes check the ``*.dist-info`` /
``*.egg-info`` entries of every ``sys.path`` directory (one ``stat`` per directory while nothing
was installed or removed there) and the plugin modules' files, and replay the registrations
without importing any plugin. A broken plugin, one that registers objects rather than dotted
strings, and a name the cache does not know (an unknown scheme, a protocol registered at run
time) always take the full path, so what is found, warned and reported is what a full discovery
gives.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import AddonNotFoundError, BackendNotFoundError, FormatNotFoundError, PluginError

log = logging.getLogger("ckptio.plugins")

ENTRY_POINT_GROUP = "ckptio"
ALLOW_ENV = "CKPTIO_PLUGINS"
#: ``0``/``off`` disables the discovery cache; any other value is the directory to keep it in.
CACHE_ENV = "CKPTIO_PLUGIN_CACHE"
_CACHE_VERSION = 1
_CACHE_FILES = 64
#: a file or directory changed this recently may change again within the same timestamp tick
_RACY_NS = 2_000_000_000
_EP_PATTERN = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")

#: Where to find what is not installed: scheme/format/addon -> pip requirement(s).
INSTALL_HINTS: dict[str, dict[str, str]] = {
    "backend": {
        "file": "ckptio-local",
        "s3": "ckptio-fsspec s3fs",
        "s3a": "ckptio-fsspec s3fs",
        "gs": "ckptio-fsspec gcsfs",
        "gcs": "ckptio-fsspec gcsfs",
        "az": "ckptio-fsspec adlfs",
        "abfs": "ckptio-fsspec adlfs",
        "abfss": "ckptio-fsspec adlfs",
        "memory": "ckptio-fsspec",
        "hf": "ckptio-fsspec huggingface_hub",
        "http": "ckptio-fsspec aiohttp",
        "https": "ckptio-fsspec aiohttp",
        "msc": "ckptio-msc",
    },
    "format": {"safetensors": "ckptio-safetensors"},
    "addon": {
        "peft": "ckptio-peft",
        "consolidated-hf": "ckptio-consolidated-hf",
        "dora": "ckptio-dora",
    },
    # subcommands of the ``ckptio`` command line that plugins add (``register_commands``)
    "command": {"consolidate": "ckptio-safetensors"},
    # trainer integrations (``register_integrations``)
    "integration": {"lightning": "ckptio-lightning", "transformers": "ckptio-transformers"},
}


@dataclass
class Registration:
    kind: str  # "backend" | "format" | "addon" | "command" | "integration"
    name: str
    target: Any
    plugin: str
    priority: int = 0


@dataclass
class PluginInfo:
    """What ``ckptio plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    backends: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    addons: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    integrations: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Registry:
    def __init__(self, *, read_cache: bool = True) -> None:
        self.pm = pluggy.PluginManager("ckptio")
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, dict[str, Registration]] = {
            "backend": {},
            "format": {},
            "addon": {},
            "command": {},
            "integration": {},
        }
        self.plugins: dict[str, PluginInfo] = {}
        self._loaded = False
        self._lock = threading.RLock()
        self._read_cache = read_cache
        #: entry points replayed from the cache, not imported: ``name -> value``, in order
        self._replayed: dict[str, str] = {}
        #: what the plugins being loaded register, for the cache (``None``: not cacheable)
        self._recording: dict[str, list[list[Any]] | None] = {}

    # -- registration ---------------------------------------------------------------------
    def add(
        self, kind: str, name: str, target: Any, plugin: str, priority: int = 0, clobber: bool = False
    ) -> None:
        rec = self._recording.get(plugin, None)
        if rec is not None:
            entry = _cacheable(kind, name, target, priority)
            if entry is None:
                self._recording[plugin] = None
            else:
                rec.append(entry)
        name = name.lower()
        table = self.entries[kind]
        old = table.get(name)
        if old is not None and not clobber and old.priority >= priority and old.plugin != plugin:
            log.debug("%s %r from %s kept over %s", kind, name, old.plugin, plugin)
            return
        table[name] = Registration(kind, name, target, plugin, priority)
        info = self.plugins.setdefault(plugin, PluginInfo(name=plugin))
        getattr(info, kind + "s").append(name)

    def register_plugin(self, obj: Any, name: str, info: PluginInfo | None = None) -> None:
        """Register a module/object of hookimpls and run its ``register_*`` hooks."""
        with self._lock:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            self.plugins[name] = info or self.plugins.get(name) or PluginInfo(name=name)
            self.pm.register(obj, name=name)
            for kind in ("backend", "format", "addon", "command", "integration"):
                hook = getattr(self.pm.hook, f"register_{kind}s")
                impls = [i for i in hook.get_hookimpls() if i.plugin_name == name]
                for impl in impls:

                    def register(n: str, target: Any, priority: int = 0, *, _k: str = kind) -> None:
                        self.add(_k, n, target, name, priority)

                    try:
                        impl.function(_command_register(self, name) if kind == "command" else register)
                    except Exception as exc:
                        raise PluginError(
                            f"plugin {name!r} failed in register_{kind}s: {type(exc).__name__}: {exc}"
                        ) from exc

    # -- discovery ------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        allow_raw = os.environ.get(ALLOW_ENV)
        allow = None if allow_raw is None else {a.strip() for a in allow_raw.split(",") if a.strip()}
        cache = _DiscoveryCache.for_this_process()
        cached = cache.read() if cache is not None and self._read_cache else None
        if cached is not None:
            eps: list[dict[str, Any]] = cached["entry_points"]
            records: dict[str, Any] = cached["plugins"]
        else:
            stamps = _path_stamps(cache.paths) if cache is not None else []
            eps, records = _scan_entry_points(), {}
        before = set(sys.modules)
        loaded_any = False
        for ep in eps:
            info = PluginInfo(
                name=ep["name"], distribution=ep["dist"], version=ep["version"], module=ep["value"]
            )
            if ep["name"] in self.plugins and self.plugins[ep["name"]].module:
                continue  # first installed distribution wins, as in pluggy
            # the core's own built-ins (the native format) are part of ckptio, not optional plugins
            builtin = info.distribution == "ckptio"
            if allow is not None and ep["name"] not in allow and not builtin:
                info.skipped = True
                self.plugins[ep["name"]] = info
                continue
            rec = records.get(ep["name"])
            if rec is not None and rec["value"] == ep["value"]:
                self._replay(info, rec["registrations"])
                continue
            records.pop(ep["name"], None)
            if self._load_one(info):
                loaded_any = True
                regs = self._recording.get(info.name)
                if regs is not None:
                    records[info.name] = {"value": ep["value"], "registrations": regs}
        self._recording.clear()
        if cache is None or not (loaded_any or cached is None):
            return
        files = cached["files"] if cached is not None else []
        modules = set(sys.modules) - before
        for rec in records.values():
            # each plugin's own module and its packages, even when imported before discovery
            parts = _EP_PATTERN.match(rec["value"])
            mod = parts.group("module").split(".") if parts else []
            modules.update(".".join(mod[: i + 1]) for i in range(len(mod)))
        files = _merge_file_stamps(files, modules)
        cache.write(
            stamps=cached["stamps"] if cached is not None else stamps,
            entry_points=eps,
            plugins=records,
            files=files,
        )

    def _load_one(self, info: PluginInfo) -> bool:
        """Import one entry point and run its hooks; a failure is recorded and warned about."""
        self._recording[info.name] = []
        try:
            obj = _load_entry_point(info.module or "")
            self.register_plugin(obj, info.name, info)
            return True
        except Exception as exc:  # a broken plugin must not break the host
            info.error = f"{type(exc).__name__}: {exc}"
            self.plugins[info.name] = info
            self._recording[info.name] = None
            warnings.warn(
                f"ckptio: plugin {info.name!r} ({info.distribution}) failed to load: {info.error}",
                RuntimeWarning,
                stacklevel=4,
            )
            return False

    def _replay(self, info: PluginInfo, registrations: list[list[Any]]) -> None:
        """What the plugin registered last time, without importing it."""
        self.plugins[info.name] = info
        self._replayed[info.name] = info.module or ""
        for kind, name, target, priority in registrations:
            if kind == "command":
                target = CommandSpec(
                    name,
                    target["add_arguments"],
                    target["run"],
                    target["help"],
                    target["description"],
                    info.name,
                )
            self.add(kind, name, target, info.name, priority)

    def load_replayed(self) -> bool:
        """Import the plugins replayed from the cache and run their hooks (a name the cache does
        not know: the full discovery decides). True if there were any."""
        with self._lock:
            if not self._replayed:
                return False
            replayed, self._replayed = self._replayed, {}
            for name in replayed:
                old = self.plugins[name]
                info = PluginInfo(
                    name=name, distribution=old.distribution, version=old.version, module=old.module
                )
                for table in self.entries.values():
                    for key in [k for k, r in table.items() if r.plugin == name]:
                        del table[key]
                self._load_one(info)
            self._recording.clear()
            return True

    # -- lookup ---------------------------------------------------------------------------
    def resolve(self, kind: str, name: str) -> Registration | None:
        self.ensure_loaded()
        reg = self.entries[kind].get(name.lower())
        if reg is None and self._replayed and self.load_replayed():
            reg = self.entries[kind].get(name.lower())
        return reg

    def materialize(self, reg: Registration) -> Any:
        target = reg.target
        if isinstance(target, str):
            mod_name, _, attr = target.partition(":")
            try:
                obj: Any = importlib.import_module(mod_name)
                for part in attr.split(".") if attr else []:
                    obj = getattr(obj, part)
            except Exception as exc:
                hint = INSTALL_HINTS.get(reg.kind, {}).get(reg.name)
                extra = f"; try: pip install {hint}" if hint else ""
                raise PluginError(
                    f"{reg.kind} {reg.name!r} from plugin {reg.plugin!r} failed to import {target!r}: {exc}{extra}"
                ) from exc
            reg.target = target = obj
        return target


# -- the discovery cache ------------------------------------------------------------------------
def _load_entry_point(value: str) -> Any:
    """``importlib.metadata.EntryPoint.load`` without building the metadata."""
    match = _EP_PATTERN.match(value)
    if match is None:
        raise ValueError(f"invalid entry point {value!r}")
    obj: Any = importlib.import_module(match.group("module"))
    for part in filter(None, (match.group("attr") or "").split(".")):
        obj = getattr(obj, part)
    return obj


def _dotted(obj: Any) -> str | None:
    """``"module:qualname"`` that imports back to ``obj`` itself, if there is one."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(mod, str) or not isinstance(qual, str) or "<" in qual:
        return None
    found: Any = sys.modules.get(mod)
    for part in qual.split("."):
        found = getattr(found, part, None)
    return f"{mod}:{qual}" if found is obj else None


def _cacheable(kind: str, name: str, target: Any, priority: int) -> list[Any] | None:
    """One registration as JSON (objects by their dotted name), or None when it cannot be."""
    if isinstance(target, CommandSpec):
        add_arguments = (
            target.add_arguments if isinstance(target.add_arguments, str) else _dotted(target.add_arguments)
        )
        run = target.run if isinstance(target.run, str) else _dotted(target.run)
        if add_arguments is None or run is None:
            return None
        spec = {
            "add_arguments": add_arguments,
            "run": run,
            "help": target.help,
            "description": target.description,
        }
        return [kind, target.name, spec, priority]
    text = target if isinstance(target, str) else _dotted(target)
    if text is None or not isinstance(name, str) or not isinstance(priority, int):
        return None
    return [kind, name, text, priority]


def _scan_entry_points() -> list[dict[str, Any]]:
    """Every ``ckptio`` entry point of the installed distributions (the full metadata scan)."""
    import importlib.metadata as md

    out = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        out.append(
            {
                "name": ep.name,
                "value": ep.value,
                "dist": dist.metadata["Name"] if dist is not None else None,
                "version": dist.version if dist is not None else None,
            }
        )
    return out


def _path_stamps(paths: list[str]) -> list[list[Any]]:
    """``[path, mtime_ns, [[dist-info name, mtime_ns], ...]]`` per ``sys.path`` entry: what
    ``importlib.metadata`` reads the installed distributions from."""
    out: list[list[Any]] = []
    for path in paths:
        out.append(_stamp_one(path))
    return out


def _stamp_one(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    if not os.path.isdir(path):
        return [path, st.st_mtime_ns, st.st_size]
    dists: list[list[Any]] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.endswith((".dist-info", ".egg-info")):
                    try:
                        dists.append([entry.name, entry.stat().st_mtime_ns])
                    except OSError:
                        dists.append([entry.name, None])
    except OSError:
        return [path, None, None]
    dists.sort()
    return [path, st.st_mtime_ns, dists]


def _stamps_valid(stamps: list[list[Any]], paths: list[str]) -> bool:
    if [s[0] for s in stamps] != paths:
        return False
    for path, mtime, dists in stamps:
        try:
            st = os.stat(path)
        except OSError:
            if mtime is not None:
                return False
            continue
        if mtime is not None and st.st_mtime_ns == mtime:
            continue  # nothing added to or removed from the directory since
        if not isinstance(dists, list):
            return False  # a zip file or an egg that changed
        if _stamp_one(path)[2] != dists:
            return False
    return True


def _file_stamp(path: str) -> list[Any]:
    try:
        st = os.stat(path)
        return [path, st.st_mtime_ns, st.st_size]
    except OSError:
        return [path, None, None]


def _merge_file_stamps(files: list[list[Any]], modules: set[str]) -> list[list[Any]]:
    """The source files of the modules plugin loading imported (and this one): editing a plugin
    in an editable install changes what it registers with nothing reinstalled."""
    paths = {f[0] for f in files}
    out = list(files)
    for mod_name in sorted(modules | {__name__}):
        path = getattr(sys.modules.get(mod_name), "__file__", None)
        if isinstance(path, str) and path not in paths:
            paths.add(path)
            out.append(_file_stamp(path))
    return out


class _DiscoveryCache:
    """One JSON file per interpreter and ``sys.path``: the entry points and their registrations."""

    def __init__(self, directory: Path, paths: list[str]) -> None:
        self.paths = paths
        self.key = [_CACHE_VERSION, sys.executable, sys.prefix, list(sys.version_info[:2]), paths]
        digest = hashlib.sha256(json.dumps(self.key).encode()).hexdigest()[:20]
        self.file = directory / f"plugins-{digest}.json"

    @classmethod
    def for_this_process(cls) -> _DiscoveryCache | None:
        setting = os.environ.get(CACHE_ENV)
        if setting is not None and setting.strip().lower() in ("", "0", "off", "no", "false"):
            return None
        if setting:
            directory = Path(setting).expanduser()
        else:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            directory = Path(base) / "ckptio"
        cwd = os.getcwd()
        paths = [os.path.abspath(p) if p else cwd for p in sys.path]
        return cls(directory, paths)

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.file.read_bytes())
            if data.get("key") != self.key:
                return None
            if not _stamps_valid(data["stamps"], self.paths):
                return None
            for path, mtime, size in data["files"]:
                if _file_stamp(path) != [path, mtime, size]:
                    return None
            if not isinstance(data["entry_points"], list) or not isinstance(data["plugins"], dict):
                return None
            return dict(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.debug("plugin discovery cache %s not used: %s", self.file, exc)
            return None

    def write(self, **fields: Any) -> None:
        recent = time.time_ns() - _RACY_NS
        stamps: list[list[Any]] = [list(s) for s in fields["stamps"]]
        for stamp in stamps:
            if isinstance(stamp[2], list) and any(m is None or m >= recent for _, m in stamp[2]):
                return  # a distribution is being installed right now: the next process decides
            if stamp[1] is not None and stamp[1] >= recent:
                stamp[1] = None  # compare the directory's distributions next time, not its mtime
        if any(m is None or m >= recent for _, m, _ in fields["files"]):
            return
        data = {"key": self.key, **fields, "stamps": stamps}
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.file)
            self._prune()
        except OSError as exc:
            log.debug("plugin discovery cache %s not written: %s", self.file, exc)
            try:
                tmp.unlink()
            except OSError:
                pass

    def _prune(self, keep: int = _CACHE_FILES) -> None:
        """At most ``keep`` cache files (one per interpreter and ``sys.path``: test suites that
        run interpreters with temporary paths would otherwise leave one per run): the oldest go."""
        files = list(self.file.parent.glob("plugins-*.json"))
        if len(files) <= keep:
            return
        files.sort(key=lambda f: f.stat().st_mtime if f.exists() else 0.0)
        for f in files[: len(files) - keep]:
            if f != self.file:
                f.unlink(missing_ok=True)


_registry = _Registry()


def _hint(kind: str, name: str) -> str:
    hint = INSTALL_HINTS[kind].get(name.lower())
    if hint:
        return f"pip install {hint}"
    if kind == "backend":
        return f"pip install a ckptio backend plugin that serves {name}:// (see docs/writing-a-backend.md)"
    return "install a ckptio plugin that provides it"


def _installed_schemes() -> str:
    """The installed backends' schemes, short: those a plugin registers as a catch-all (a negative
    priority, like every other fsspec protocol) are one count per plugin."""
    named: list[str] = []
    caught: dict[str, int] = {}
    for scheme, reg in sorted(_registry.entries["backend"].items()):
        if reg.priority < 0:
            caught[reg.plugin] = caught.get(reg.plugin, 0) + 1
        else:
            named.append(scheme)
    counts = [f"{n} more through {plugin}" for plugin, n in sorted(caught.items())]
    if named and counts:
        counts[-1] = "and " + counts[-1]
    return ", ".join(named + counts) or "none"


def _unknown_scheme_message(scheme: str) -> str:
    """One line: the scheme, the closest installed one, what is installed, what to install."""
    entries = _registry.entries["backend"]
    named = [n for n, reg in entries.items() if reg.priority >= 0]
    close = difflib.get_close_matches(scheme.lower(), named, n=1, cutoff=0.5) or difflib.get_close_matches(
        scheme.lower(), list(entries), n=1
    )
    maybe = (
        f" (did you mean {close[0]}://?)" if close and scheme.lower() not in INSTALL_HINTS["backend"] else ""
    )
    return (
        f"no ckptio backend for {scheme}:// URLs{maybe}. Installed: {_installed_schemes()}. "
        f"{_hint('backend', scheme)}"
    )


def backend_factory(scheme: str) -> Any:
    """The factory registered for ``scheme``; raises :class:`BackendNotFoundError` with a hint."""
    reg = _registry.resolve("backend", scheme)
    if reg is None:
        raise BackendNotFoundError(_unknown_scheme_message(scheme))
    return _registry.materialize(reg)


def get_format(name: str) -> Any:
    """The :class:`~ckptio.Format` registered as ``name`` (an instance)."""
    reg = _registry.resolve("format", name)
    if reg is None:
        known = ", ".join(sorted(_registry.entries["format"])) or "none"
        raise FormatNotFoundError(
            f"no ckptio format named {name!r} (installed: {known}); {_hint('format', name)}"
        )
    fmt = _registry.materialize(reg)
    if isinstance(fmt, type):
        fmt = fmt()
        reg.target = fmt
    return fmt


def format_names() -> list[str]:
    _registry.ensure_loaded()
    return sorted(_registry.entries["format"])


def get_addon_factory(name: str) -> Any:
    reg = _registry.resolve("addon", name)
    if reg is None:
        known = ", ".join(sorted(_registry.entries["addon"])) or "none"
        raise AddonNotFoundError(
            f"no ckptio addon named {name!r} (installed: {known}); {_hint('addon', name)}"
        )
    return _registry.materialize(reg)


def register_backend(scheme: str, factory: Any, *, priority: int = 0, clobber: bool = True) -> None:
    """Register a backend at runtime (same path as entry points). Overrides by default."""
    _registry.ensure_loaded()
    _registry.add("backend", scheme, factory, "__runtime__", priority, clobber=clobber)


def register_format(name: str, fmt: Any, *, clobber: bool = True) -> None:
    """Register a format at runtime."""
    _registry.ensure_loaded()
    _registry.add("format", name, fmt, "__runtime__", clobber=clobber)


def register_addon(name: str, factory: Any, *, clobber: bool = True) -> None:
    """Register an addon factory (or a class) at runtime under ``name``."""
    _registry.ensure_loaded()
    _registry.add("addon", name, factory, "__runtime__", clobber=clobber)


def register_plugin(obj: Any, name: str | None = None) -> None:
    """Register a module or object holding ``register_*`` hook implementations."""
    _registry.ensure_loaded()
    _registry.register_plugin(obj, name or str(getattr(obj, "__name__", type(obj).__name__)))


def unregister(kind: str, name: str) -> None:
    """Forget a registration (tests use this to clean up)."""
    _registry.entries[kind].pop(name.lower(), None)


def list_plugins() -> list[PluginInfo]:
    """Every plugin seen: loaded, skipped by ``CKPTIO_PLUGINS``, or broken (with its error)."""
    _registry.ensure_loaded()
    return sorted(_registry.plugins.values(), key=lambda p: p.name)


def reload_plugins() -> None:
    """Forget everything and discover entry points again (after a ``pip install``)."""
    global _registry
    _registry = _Registry(read_cache=False)
    importlib.invalidate_caches()
    _registry.ensure_loaded()


# -- commands: subcommands of the ``ckptio`` command line that plugins add ---------------------
@dataclass
class CommandSpec:
    """One subcommand registered through the ``register_commands`` hook.

    ``add_arguments`` and ``run`` are callables or lazy ``"module:function"`` strings (see
    :func:`ckptio.hookspecs.register_commands`); :func:`load_command` imports them, only for the
    command that runs, so a plugin's command-line code costs nothing to the other commands.
    """

    name: str
    add_arguments: Any
    run: Any
    help: str = ""
    description: str | None = None
    plugin: str = ""


def _command_register(registry: _Registry, plugin: str) -> Any:
    """The ``register`` callable handed to one plugin's ``register_commands`` hook."""

    def register(
        name: str, add_arguments: Any, run: Any, *, help: str = "", description: str | None = None
    ) -> None:
        if not isinstance(name, str) or not name or name.startswith("-") or " " in name:
            raise ValueError(f"invalid command name {name!r}")
        spec = CommandSpec(name.lower(), add_arguments, run, help, description, plugin)
        registry.add("command", name, spec, plugin)

    return register


def command_specs() -> dict[str, CommandSpec]:
    """Every subcommand plugins registered, by name (the first plugin to register a name wins)."""
    _registry.ensure_loaded()
    return {name: reg.target for name, reg in sorted(_registry.entries["command"].items())}


def load_command(spec: CommandSpec) -> tuple[Any, Any]:
    """``(add_arguments, run)`` of ``spec``, lazy strings imported; a failed import is a
    :class:`PluginError` that names the package to install, as for backends and formats."""
    parts = []
    for target in (spec.add_arguments, spec.run):
        reg = Registration("command", spec.name, target, spec.plugin)
        parts.append(_registry.materialize(reg))
    return parts[0], parts[1]


def command_hint(name: str) -> str | None:
    """The distribution that provides command ``name`` when it is not installed, if known."""
    return INSTALL_HINTS["command"].get(name.lower())


def integration_names() -> list[str]:
    """The installed trainer integrations (``register_integrations``), by name."""
    _registry.ensure_loaded()
    return sorted(_registry.entries["integration"])
