"""The ``dora`` addon: store DoRA magnitudes under their HF PEFT on-disk names.

With ``addons=["dora"]`` a checkpoint holds ``<module>.lora_magnitude_vector`` whether the model
in memory is an HF PEFT model (``...lora_magnitude_vector.<adapter>.weight``) or a NeMo AutoModel
one (``...lora_magnitude``), so checkpoints of both stacks share key names.

On load :meth:`DoraAddon.transform_state_dict` renames the *destination* to the names stored in
the checkpoint before anything is read, and :meth:`DoraAddon.restore_state_dict` renames it back
afterwards, so the model receives its own names. Which stored name to look up is decided per key
from the tensors the checkpoint lists: the current on-disk form, then the legacy
``...lora_magnitude_vector.default.weight``, then the in-memory name itself (a checkpoint saved
without this addon).
"""

from __future__ import annotations

import logging
from typing import Any

from ckptio.ext import AddonContext

from .names import LEGACY_ADAPTER, legacy_key, module_of, to_hf_key

log = logging.getLogger("ckptio.dora")

_SCRATCH = "dora.renames"
Path = tuple[str, ...]


def _stored_names(ctx: AddonContext) -> set[str] | None:
    """Flattened names of the tensors in the checkpoint being loaded, ``None`` when unknown."""
    if ctx.manifest is None:
        return None
    try:
        from ckptio.ext import get_format

        entries = get_format(ctx.manifest.format).tensors(ctx.backend, ctx.path, ctx.manifest)
    except Exception as exc:  # listing is an optimisation; fall back to the manifest's addon list
        log.debug("could not list the tensors of %s: %s", ctx.url, exc)
        return None
    return {e.name for e in entries} or None


class DoraAddon:
    """Renames DoRA magnitude keys between in-memory and on-disk names (save and load).

    :param legacy_adapter: the adapter name of the legacy on-disk form accepted on load.
    """

    name = "dora"

    def __init__(self, legacy_adapter: str = LEGACY_ADAPTER) -> None:
        self.legacy_adapter = legacy_adapter

    def _stored_name(self, key: str, prefix: str, stored: set[str] | None, saved_with_addon: bool) -> str:
        current = to_hf_key(key)
        if stored is None:
            return current if saved_with_addon else key
        for candidate in (current, legacy_key(key, self.legacy_adapter), key):
            if prefix + candidate in stored:
                return candidate
        return current  # not stored at all: let the strict load report the on-disk name as missing

    def transform_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        renames: list[tuple[Path, str, str]] = ctx.scratch.setdefault(_SCRATCH, [])
        stored = _stored_names(ctx) if ctx.op == "load" else None
        saved_with_addon = ctx.manifest is None or "dora" in ctx.manifest.addons

        def walk(d: dict[str, Any], path: Path) -> None:
            prefix = "".join(p + "." for p in path)
            items = list(d.items())
            changed = False
            for i, (key, value) in enumerate(items):
                if isinstance(value, dict):
                    walk(value, (*path, str(key)))
                    continue
                if not isinstance(key, str) or module_of(key) is None:
                    continue
                new = (
                    to_hf_key(key)
                    if ctx.op == "save"
                    else self._stored_name(key, prefix, stored, saved_with_addon)
                )
                if new != key:
                    if new in d:
                        raise ValueError(
                            f"{prefix}{key}: its DoRA name {new!r} is already a key of the state"
                        )
                    items[i] = (new, value)
                    renames.append((path, new, key))
                    changed = True
            if changed:  # rebuild in place, keeping the order
                d.clear()
                d.update(items)

        walk(state_dict, ())

    def restore_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        for path, new, old in reversed(ctx.scratch.pop(_SCRATCH, [])):
            d: Any = state_dict
            for p in path:
                d = d.get(p) if isinstance(d, dict) else None
            if isinstance(d, dict) and new in d:
                d[old] = d.pop(new)
