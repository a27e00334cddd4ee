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
}


@dataclass
class Registration:
    kind: str  # "backend" | "format" | "addon"
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
    error: str | None = None
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ckptio")
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, dict[str, Registration]] = {"backend": {}, "format": {}, "addon": {}}
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
            for kind in ("backend", "format", "addon"):
                hook = getattr(self.pm.hook, f"register_{kind}s")
                impls = [i for i in hook.get_hookimpls() if i.plugin_name == name]
                for impl in impls:

                    def register(n: str, target: Any, priority: int = 0, *, _k: str = kind) -> None:
                        self.add(_k, n, target, name, priority)

                    try:
                        impl.function(register)
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
    return f"pip install {hint}" if hint else "install a ckptio plugin that provides it"


def backend_factory(scheme: str) -> Any:
    """The factory registered for ``scheme``; raises :class:`BackendNotFoundError` with a hint."""
    reg = _registry.resolve("backend", scheme)
    if reg is None:
        known = ", ".join(sorted(_registry.entries["backend"])) or "none"
        raise BackendNotFoundError(
            f"no ckptio backend for {scheme}:// URLs (installed: {known}); {_hint('backend', scheme)}"
        )
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
