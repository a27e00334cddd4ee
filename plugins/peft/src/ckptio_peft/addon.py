"""The ``peft`` addon: a checkpoint of a PEFT fine-tune that PEFT itself can load.

Design choice: **the checkpoint's model entry holds only the adapter weights** (``filter_model=True``,
the default). The base model is frozen and reproducible from its own reference, so writing it at
every step would multiply the checkpoint size by hundreds for nothing. The native tensors (and
the optimizer state, which only covers trainable parameters anyway) stay in ckptio's format, so
resuming is an ordinary ``ckptio.load(state, url, addons=["peft"])`` / ``manager.load(state)``
with resharding; on load the destination is filtered the same way before reading and the base
weights are handed back untouched afterwards, so ``ModelState``'s strict ``load_state_dict`` sees a
complete dict.

In addition, before the commit (so it is covered by the manifest, on any backend), rank 0
writes into the checkpoint directory (or ``subdir``):

* ``adapter_model.safetensors`` in HF PEFT's on-disk convention (``base_model.model.<fqn>``, no
  adapter name, DoRA magnitude as ``<module>.lora_magnitude_vector``),
* ``adapter_config.json``,
* the tokenizer files when ``tokenizer=`` is given,

so ``PeftModel.from_pretrained(base_model, "<root>/step_00000100")`` works on the step directory.
Under FSDP2 the adapter shards are gathered (over ckptio's own process group, see
:mod:`ckptio.gather`) and written once. The adapter is the tuner weights and the
``modules_to_save`` copies (a trained classifier or ``lm_head``), in the file and in the native entry.

The other way round, ``ckptio.load(state, url, addons=["peft"])`` also reads a directory PEFT's
``save_pretrained`` wrote (no manifest, an ``adapter_model.safetensors``): the destination's adapter
tensors are looked up under their on-disk names (legacy DoRA names included) and the base weights
are left as they are. Such a directory holds the adapter only, so a strict load wants a state
holding just the model.

Options (``addons=[("peft", {...})]``): ``model`` (else the ``ckptio.ModelState`` in the state that
wraps a PEFT model), ``adapter_name`` (``"default"``), ``tokenizer``, ``subdir`` (``""``),
``filter_model`` (``True``), ``peft_config`` (a ``PeftConfig`` or dict, for models without one) and
the ``LoraConfig`` fields ``r``, ``lora_alpha``, ``target_modules``, ``use_dora``, ``task_type``,
``bias``, ``base_model_name_or_path``.
"""

from __future__ import annotations

from typing import Any

import torch
from ckptio.errors import CheckpointError
from ckptio.ext import AddonContext, ModelState, addon_hook, full_tensor, pretrained_files
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_ADAPTER,
    adapter_bytes,
    adapter_names,
    disk_name,
    is_peft_model,
    peft_config_json,
    stored_adapter_keys,
)

_CONFIG_OPTIONS = ("r", "lora_alpha", "target_modules", "use_dora", "task_type", "bias")


class PeftAddon:
    """Writes the adapter in HF PEFT's format and keeps the native checkpoint adapter-only."""

    name = "peft"

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        tokenizer: Any = None,
        subdir: str = "",
        filter_model: bool = True,
        peft_config: Any = None,
        base_model_name_or_path: str | None = None,
        **config_options: Any,
    ) -> None:
        unknown = set(config_options) - set(_CONFIG_OPTIONS)
        if unknown:
            raise TypeError(f"peft addon: unknown options {sorted(unknown)}; known: {list(_CONFIG_OPTIONS)}")
        self.model = model
        self.adapter_name = adapter_name
        self.tokenizer = tokenizer
        self.subdir = subdir.strip("/")
        self.filter_model = filter_model
        self.peft_config = peft_config
        self.base_model_name_or_path = base_model_name_or_path
        self.config_options = config_options

    # -- which model ---------------------------------------------------------------------------
    def _find(self, state: dict[str, Any]) -> tuple[torch.nn.Module | None, str | None]:
        """The model and its key in the state: the explicit one, else the (PEFT) ``ModelState``."""
        wrapped = [
            (k, v.model)  # a list of pipeline parts is not a PEFT model: pass ('peft', {'model': m})
            for k, v in state.items()
            if isinstance(v, ModelState) and isinstance(v.model, torch.nn.Module)
        ]
        if self.model is not None:
            return self.model, next((k for k, m in wrapped if m is self.model), None)
        peft = [(k, m) for k, m in wrapped if is_peft_model(m)]
        chosen = peft or wrapped
        if len(chosen) > 1:
            raise CheckpointError(
                f"peft addon: several models in the state ({[k for k, _ in chosen]}); pass ('peft', {{'model': m}})"
            )
        return (chosen[0][1], chosen[0][0]) if chosen else (None, None)

    def _rel(self, name: str) -> str:
        return f"{self.subdir}/{name}" if self.subdir else name

    # -- hooks ---------------------------------------------------------------------------------
    # transform last and restore first: renaming addons (``dora``) wrap around this one
    @addon_hook(trylast=True)
    def transform_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        model, key = self._find(ctx.state)
        if model is None:
            if ctx.op == "save":
                raise CheckpointError(
                    "peft addon: no model to take the adapter from; put ckptio.ModelState(model) in the state "
                    "or pass addons=[('peft', {'model': model})]"
                )
            return
        entry = state_dict.get(key) if key is not None else None
        if ctx.op == "load" and ctx.manifest is None:  # not a ckptio checkpoint: a PEFT directory?
            stored = stored_adapter_keys(ctx.backend, ctx.path)
            if stored is not None:
                self._read_peft_directory(ctx, state_dict, model, key, entry, stored)
                return
        if not isinstance(entry, dict):  # model given only as an option: take its adapter directly
            entry, key = None, None
            source = get_model_state_dict(model) if ctx.op == "save" else {}
        else:
            source = entry
        names = adapter_names(model, list(source), self.adapter_name)
        if ctx.op == "save" and not names:
            raise CheckpointError(
                f"peft addon: the model has no weights of adapter {self.adapter_name!r} (is it a PEFT model, "
                "e.g. from peft.get_peft_model? is adapter_name right?)"
            )
        ctx.scratch["peft.model"] = model
        ctx.scratch["peft.adapter"] = [(names[k], source[k]) for k in source if k in names]
        if self.filter_model and entry is not None:
            removed = {k: entry.pop(k) for k in list(entry) if k not in names}
            if ctx.op == "load":
                ctx.scratch["peft.removed"] = (key, removed)

    def _read_peft_directory(
        self,
        ctx: AddonContext,
        state_dict: dict[str, Any],
        model: torch.nn.Module,
        key: str | None,
        entry: Any,
        stored: set[str],
    ) -> None:
        """Load from a directory PEFT's ``save_pretrained`` wrote (or any ``adapter_model.safetensors``
        without a manifest): the destination's adapter tensors go to the top level of the state
        under their on-disk names (legacy DoRA names where the file has those), so the foreign
        reader finds them as they are stored; the model entry (base weights: not in the file)
        is set aside and handed back by :meth:`restore_state_dict`."""
        if not isinstance(entry, dict):  # the model given only as an option: load into it in place
            key, entry = None, None
            source: dict[str, Any] = get_model_state_dict(model)
        else:
            source = entry
        names = adapter_names(model, list(source), self.adapter_name)
        if not names:
            raise CheckpointError(
                f"peft addon: the model has no weights of adapter {self.adapter_name!r} to load "
                f"{ctx.url} into (is it a PEFT model with the adapter's config? is adapter_name right?)"
            )
        moved: list[tuple[str, str]] = []
        for mem, disk in names.items():
            name = disk_name(disk, stored, self.adapter_name)
            if name in state_dict:
                raise CheckpointError(f"peft addon: {name!r} is already a top-level key of the state")
            state_dict[name] = source[mem]
            moved.append((mem, name))
        items = list(entry.items()) if entry is not None else []
        if key is not None:
            del state_dict[key]
        ctx.scratch["peft.directory"] = (key, items, moved)

    @addon_hook(tryfirst=True)
    def restore_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        directory = ctx.scratch.pop("peft.directory", None)
        if directory is not None:
            key, items, moved = directory
            loaded = {mem: state_dict.pop(name, None) for mem, name in moved}
            if key is not None:
                state_dict[key] = {k: (loaded[k] if loaded.get(k) is not None else v) for k, v in items}
            return
        key, removed = ctx.scratch.pop("peft.removed", (None, {}))
        if key is not None and isinstance(state_dict.get(key), dict):
            state_dict[key].update(removed)

    def on_tensors_written(self, ctx: AddonContext) -> None:
        if ctx.op != "save" or "peft.adapter" not in ctx.scratch:
            return
        # every rank takes part in the gather, in the same (state-dict) order
        full = {disk: full_tensor(t, ctx.process_group) for disk, t in ctx.scratch["peft.adapter"]}
        if not ctx.is_coordinator:
            return
        model = ctx.scratch["peft.model"]
        ctx.write_bytes(self._rel(ADAPTER_WEIGHTS), adapter_bytes(full))
        options = {k: v for k, v in self.config_options.items() if v is not None}
        ctx.write_bytes(
            self._rel(ADAPTER_CONFIG),
            peft_config_json(
                model, self.adapter_name, self.peft_config, self.base_model_name_or_path, **options
            ),
        )
        if self.tokenizer is not None:
            for name, data in pretrained_files(self.tokenizer).items():
                ctx.write_bytes(self._rel(name), data)
