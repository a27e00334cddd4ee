"""Plugin discovery and the registries of backends, formats and addons.

Entry points of the ``ckptio`` group are loaded one at a time: a plugin that fails to import or
to register is recorded (see ``ckptio plugins``) and reported as a warning, never fatal to the
host. ``CKPTIO_PLUGINS`` (comma-separated entry-point names) allow-lists which installed plugins
load; set it to the empty string to load none (the core's built-in ``native`` format always
loads). Code that is not packaged registers at runtime
with :func:`register_backend`, :func:`register_format` and :func:`register_addon` (or with
:func:`register_plugin` for a module or object of hook implementations): the same code path the
entry points take.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import AddonNotFoundError, BackendNotFoundError, FormatNotFoundError, PluginError

log = logging.getLogger("ckptio.plugins")

ENTRY_POINT_GROUP = "ckptio"
ALLOW_ENV = "CKPTIO_PLUGINS"

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
    def __init__(self) -> None:
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

    # -- registration ---------------------------------------------------------------------
    def add(
        self, kind: str, name: str, target: Any, plugin: str, priority: int = 0, clobber: bool = False
    ) -> None:
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
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            if ep.name in self.plugins and self.plugins[ep.name].module:
                continue  # first installed distribution wins, as in pluggy
            # the core's own built-ins (the native format) are part of ckptio, not optional plugins
            builtin = info.distribution == "ckptio"
            if allow is not None and ep.name not in allow and not builtin:
                info.skipped = True
                self.plugins[ep.name] = info
                continue
            try:
                obj = ep.load()
                self.register_plugin(obj, ep.name, info)
            except Exception as exc:  # a broken plugin must not break the host
                info.error = f"{type(exc).__name__}: {exc}"
                self.plugins[ep.name] = info
                warnings.warn(
                    f"ckptio: plugin {ep.name!r} ({info.distribution}) failed to load: {info.error}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # -- lookup ---------------------------------------------------------------------------
    def resolve(self, kind: str, name: str) -> Registration | None:
        self.ensure_loaded()
        return self.entries[kind].get(name.lower())

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
    _registry = _Registry()
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
