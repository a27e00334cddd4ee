"""The addon interface: hooks around save and load.

An addon is any object with methods named after the hooks below (decorating them with
:data:`addon_hook` is optional; it allows pluggy's ``tryfirst``/``trylast`` ordering). Addons are
installed as plugins (``register_addons``) and stay inert until a manager or a ``save``/``load``
call activates them: ``addons=["peft", ("consolidated-hf", {"mode": "final"}), MyAddon()]``.

Every hook receives one :class:`AddonContext`. Artifacts are written through
:meth:`AddonContext.write_bytes`, i.e. through the checkpoint's backend and into the checkpoint
before it is committed, so they are covered by the manifest and land wherever the tensors land.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
import xxhash

from .backend import Backend
from .manifest import Manifest
from .url import URL

addon_hookspec = pluggy.HookspecMarker("ckptio.addon")
addon_hook = pluggy.HookimplMarker("ckptio.addon")


@dataclass
class AddonContext:
    """What an addon hook knows about the operation in progress."""

    op: Literal["save", "load"]
    #: The checkpoint's final URL and its path in the backend.
    url: URL
    backend: Backend
    path: str
    #: Where artifacts go right now: the staging directory until the commit, then ``path``.
    write_path: str
    step: int | None
    rank: int
    world_size: int
    process_group: Any
    #: The user's state as given (top-level values may be ``Stateful`` objects).
    state: dict[str, Any]
    #: The manifest (load: the stored one; after_commit: the one just written).
    manifest: Manifest | None = None
    #: The last save of a run: ``save(..., final=True)`` or ``CheckpointManager.save(..., final=True)``.
    final: bool = False
    #: Addon-specific values shared between hooks of one operation.
    scratch: dict[str, Any] = field(default_factory=dict)
    #: Files written through :meth:`write_bytes`: name -> {"size", "xxh3"} (goes into the manifest).
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def is_final(self) -> bool:
        """Deprecated: :attr:`final`, the name of the ``save`` argument that sets it."""
        warnings.warn("AddonContext.is_final is deprecated, use ctx.final", DeprecationWarning, stacklevel=2)
        return self.final

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write an artifact (relative name, e.g. ``"adapter_config.json"``) into the checkpoint."""
        self.backend.write_bytes(self.backend.join(self.write_path, name), data)
        self.artifacts[name] = {"size": len(data), "xxh3": xxhash.xxh3_64_hexdigest(data)}

    def read_bytes(self, name: str) -> bytes:
        return self.backend.read_bytes(self.backend.join(self.write_path, name))

    def exists(self, name: str) -> bool:
        return self.backend.exists(self.backend.join(self.write_path, name))


def pretrained_files(obj: Any) -> dict[str, bytes]:
    """The files ``obj.save_pretrained(directory)`` writes, by relative name.

    Hugging Face objects (configs, tokenizers, processors) only know how to save to a local
    directory; this captures their files in memory so an addon can write them into the checkpoint
    with :meth:`AddonContext.write_bytes`, on whatever backend the checkpoint lives.
    """
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="ckptio-pretrained-") as tmp:
        obj.save_pretrained(tmp)
        for root, _, files in os.walk(tmp):
            for name in sorted(files):
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    out[os.path.relpath(full, tmp).replace(os.sep, "/")] = f.read()
    return out


class AddonHooks:
    """The hooks an addon may implement (pluggy's hook specification; ``ckptio.AddonSpec`` before).

    Each is optional; all hooks of all active addons run, in pluggy's order. An addon does not
    need to subclass this class: methods named like these hooks are enough.
    """

    @addon_hookspec
    def on_save_start(self, ctx: AddonContext) -> None:
        """Before any tensor is written: write artifacts that must exist before the data."""

    @addon_hookspec
    def transform_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        """Rename or filter entries *in place*, from in-memory names to stored names.

        Runs on save before the tensors are planned, and on load on the destination before the
        tensors are read (so the stored names are looked up), always with ``Stateful`` values
        already expanded to their state dicts.
        """

    @addon_hookspec
    def restore_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        """On load, after the tensors are read: undo :meth:`transform_state_dict` in place."""

    @addon_hookspec
    def on_tensors_written(self, ctx: AddonContext) -> None:
        """After every rank wrote its tensors, before the commit: write trailing artifacts."""

    @addon_hookspec
    def after_commit(self, ctx: AddonContext) -> None:
        """After the checkpoint is committed (in the background for async managers); e.g. export."""

    @addon_hookspec
    def validate_load(self, ctx: AddonContext) -> None:
        """Before tensors are read; raise a :class:`~ckptio.CheckpointError` to refuse the load."""

    @addon_hookspec
    def on_load_end(self, ctx: AddonContext) -> None:
        """After the state was restored."""


_HOOK_NAMES = {n for n in vars(AddonHooks) if not n.startswith("_")}


class _AddonPluginManager(pluggy.PluginManager):
    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in _HOOK_NAMES and callable(getattr(plugin, name, None)):
            return {}  # undecorated methods named like a hook are hooks too
        return opts


#: What ``addons=`` takes, item by item: an installed addon's name, ``(name, {options})``, or an
#: object implementing some of the :class:`AddonHooks`.
AddonLike = str | tuple[str, dict[str, Any]] | Any


class AddonSet:
    """The addons active for one manager or call, with their hooks."""

    def __init__(self, addons: Iterable[AddonLike] = ()) -> None:
        self.pm = _AddonPluginManager("ckptio.addon")
        self.pm.add_hookspecs(AddonHooks)
        self.names: list[str] = []
        for spec in addons:
            self.add(spec)

    def add(self, spec: AddonLike) -> Any:
        from .plugins import get_addon_factory

        if isinstance(spec, str):
            obj = get_addon_factory(spec)()
            name = spec
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            obj = get_addon_factory(spec[0])(**spec[1])
            name = spec[0]
        else:
            obj = spec
            name = getattr(obj, "name", None) or type(obj).__name__
        self.pm.register(obj, name=f"{name}#{len(self.names)}")
        self.names.append(name)
        return obj

    def __bool__(self) -> bool:
        return bool(self.names)

    @property
    def hook(self) -> Any:
        return self.pm.hook


#: Old names, kept working with a :class:`DeprecationWarning`.
_DEPRECATED = {"AddonSpec": ("AddonHooks", AddonHooks), "AddonSpecLike": ("AddonLike", AddonLike)}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(f"ckptio.addons.{name} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
