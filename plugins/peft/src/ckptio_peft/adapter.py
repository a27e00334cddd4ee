"""PEFT adapter files: which weights are the adapter, their on-disk names, reading them back.

The on-disk convention is HF PEFT's (``save_pretrained`` / ``PeftModel.from_pretrained``):
``adapter_model.safetensors`` keyed ``base_model.model.<fqn>`` *without* the adapter name
(``...q_proj.lora_A.weight``), DoRA magnitudes as ``...q_proj.lora_magnitude_vector`` (see
:mod:`ckptio_dora.names`), next to ``adapter_config.json``.

The names are computed from the model rather than by pattern matching: every PEFT tuner layer
declares the attributes holding its adapter weights (``adapter_layer_names``), and a weight is
the adapter's exactly when it lives under ``<layer>.<attr>.<adapter>``; ``modules_to_save`` copies
(``<module>.modules_to_save.<adapter>.weight`` in memory, ``<module>.weight`` on disk) are mapped
by their wrappers' own ``adapter_state_dict_load_map``, as PEFT does. Module names are taken as
torch's state-dict helpers spell them, without wrapper components (``_checkpoint_wrapped_module``,
``_orig_mod``, ``_fsdp_wrapped_module``), so wrapped models are seen through. Models that are not
PEFT models (NeMo AutoModel style, where LoRA modules carry ``lora_`` names and no adapter name)
fall back to "every key containing ``lora_``", prefixed with ``base_model.model.`` on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ckptio_dora
import safetensors.torch
import torch
from ckptio.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
)
from ckptio.ext import Backend, open_backend
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HF_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"


#: Attributes through which wrappers hold the module they stand for, and which torch's state-dict
#: helpers leave out of the FQNs: activation checkpointing's ``CheckpointWrapper``,
#: ``torch.compile``'s ``OptimizedModule``, FSDP1. (FSDP2's ``fully_shard`` renames nothing.)
WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
_WRAPPER_ATOMS = frozenset(WRAPPER_ATTRS)


def canonical_name(name: str) -> str:
    """``name`` (from ``named_modules``/``named_parameters``) without wrapper components, as
    ``get_model_state_dict`` spells the same FQN."""
    if not any(a in name for a in _WRAPPER_ATOMS):
        return name
    return ".".join(a for a in name.split(".") if a not in _WRAPPER_ATOMS)


def unwrap(model: Any) -> Any:
    """The module that root wrappers (``torch.compile``, ``checkpoint_wrapper``, DDP, FSDP1) stand for."""
    from torch.nn.parallel import DistributedDataParallel

    seen = 0
    while isinstance(model, torch.nn.Module) and seen < 16:
        seen += 1
        if isinstance(model, DistributedDataParallel):
            model = model.module
            continue
        inner = next((model._modules[a] for a in WRAPPER_ATTRS if model._modules.get(a) is not None), None)
        if inner is None:
            break
        model = inner
    return model


def is_peft_model(model: Any) -> bool:
    return isinstance(getattr(unwrap(model), "peft_config", None), dict)


def _root_prefix(model: Any) -> str:
    """What the on-disk names have before the model's own FQNs: nothing for a ``PeftModel``
    (its FQNs start with ``base_model.model.``), ``base_model.`` for a bare tuner (``LoraModel``)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    return "base_model." if isinstance(model, BaseTuner) and not isinstance(model, PeftModel) else ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _aux_load_map(module: torch.nn.Module, adapter_name: str) -> dict[str, str]:
    """``{on-disk name: in-memory name}`` (relative to ``module``) of an auxiliary training wrapper
    (``modules_to_save``, trainable tokens), as PEFT itself maps them; ``{}`` for other modules."""
    import peft.utils.other

    aux: Any = getattr(peft.utils.other, "AuxiliaryTrainingWrapper", None)  # older PEFT: none
    if aux is not None and isinstance(module, aux):
        try:
            return dict(module.adapter_state_dict_load_map(adapter_name))  # type: ignore[operator]
        except NotImplementedError:
            return {}
    holder = module._modules.get("modules_to_save")
    if type(module).__name__ == "ModulesToSaveWrapper" and isinstance(holder, torch.nn.ModuleDict):
        if adapter_name in holder:
            return {k: f"modules_to_save.{adapter_name}.{k}" for k in holder[adapter_name].state_dict()}
    return {}


@dataclass
class AdapterLayout:
    """Where the weights of one adapter live in a PEFT model, by canonical (state-dict) names."""

    #: ``<layer>.<attr>.<adapter>`` -> ``<root><layer>.<attr>``: every key under it is the adapter's
    prefixes: dict[str, str] = field(default_factory=dict)
    #: whole keys of ``modules_to_save`` copies and other auxiliary wrappers -> on-disk names
    exact: dict[str, str] = field(default_factory=dict)
    #: the adapted (tuner) layers
    layers: set[str] = field(default_factory=set)
    root: str = ""


def adapter_layout(model: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> AdapterLayout:
    """The adapter's place in ``model`` (wrappers seen through, see :func:`canonical_name`).

    Every PEFT tuner layer declares the attributes holding its adapter weights
    (``adapter_layer_names``), and a weight is the adapter's exactly when it lives under
    ``<layer>.<attr>.<adapter>``; ``modules_to_save`` copies are listed by their wrappers
    (``adapter_state_dict_load_map``), as PEFT's ``get_peft_model_state_dict`` takes them.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = unwrap(model)
    out = AdapterLayout(root=_root_prefix(model))
    for raw, module in model.named_modules():
        name = canonical_name(raw)
        if isinstance(module, BaseTunerLayer):
            for attr in dict.fromkeys(module.adapter_layer_names):
                holder = getattr(module, attr, None)
                if (
                    isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict))
                    and adapter_name in holder
                ):
                    out.prefixes[_join(name, attr, adapter_name)] = out.root + _join(name, attr)
                    out.layers.add(name)
            continue
        for disk, mem in _aux_load_map(module, adapter_name).items():
            out.exact[_join(name, mem)] = out.root + _join(name, disk)
    return out


def adapter_names(
    model: torch.nn.Module, keys: list[str], adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, str]:
    """Map the adapter's keys among ``keys`` (in-memory state-dict names) to their on-disk names.

    The adapter's keys are its tuner weights (LoRA ``lora_A``/``lora_B``, DoRA magnitudes...) and
    its ``modules_to_save`` copies. Keys already renamed by the ``dora`` addon
    (``<layer>.lora_magnitude_vector``) are recognised.
    """
    model = unwrap(model)
    if not is_peft_model(model):
        return {k: HF_PREFIX + ckptio_dora.to_hf_key(k) for k in keys if "lora_" in k}
    layout = adapter_layout(model, adapter_name)
    own_magnitude = f"{ckptio_dora.HF_SUFFIX}.{adapter_name}.weight"
    out: dict[str, str] = {}
    for key in keys:
        if key in layout.exact:
            out[key] = layout.exact[key]
            continue
        dora_layer = ckptio_dora.module_of(key)
        if dora_layer in layout.layers and (
            key.endswith(own_magnitude) or key == dora_layer + ckptio_dora.HF_SUFFIX
        ):
            out[key] = layout.root + dora_layer + ckptio_dora.HF_SUFFIX
            continue
        head = key
        while True:  # the longest adapter prefix of the key (the key itself for a ParameterDict)
            disk = layout.prefixes.get(head)
            if disk is not None:
                out[key] = disk + key[len(head) :]
                break
            if "." not in head:
                break
            head = head.rsplit(".", 1)[0]
    return out


def peft_config_json(
    model: Any,
    adapter_name: str = DEFAULT_ADAPTER,
    config: Any = None,
    base_model_name_or_path: str | None = None,
    **options: Any,
) -> bytes:
    """``adapter_config.json`` as PEFT writes it.

    Taken from ``model.peft_config[adapter_name]`` when the model has one, else from ``config`` (a
    ``PeftConfig`` or a dict), else built as a ``LoraConfig`` from ``options`` (``r``,
    ``lora_alpha``, ``target_modules``, ``use_dora``, ``task_type``, ``bias``...). PEFT's own
    serializer writes it, so every field PEFT expects is there; ``inference_mode`` is set as
    ``save_pretrained`` does.
    """
    import copy

    from peft import LoraConfig, PeftConfig

    model = unwrap(model)
    cfg: Any = None
    if config is not None:
        cfg = copy.deepcopy(config) if isinstance(config, PeftConfig) else LoraConfig(**dict(config))
    elif is_peft_model(model) and adapter_name in model.peft_config:
        cfg = copy.deepcopy(model.peft_config[adapter_name])
    else:
        try:
            cfg = LoraConfig(**{k: v for k, v in options.items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"peft addon: cannot build adapter_config.json from options {options}: {exc}"
            ) from exc
    if not cfg.target_modules and not is_peft_model(model):
        raise CheckpointError(
            "peft addon: adapter_config.json needs target_modules (pass target_modules=[...])"
        )
    if base_model_name_or_path is not None:
        cfg.base_model_name_or_path = base_model_name_or_path
    elif cfg.base_model_name_or_path is None:
        inner = getattr(getattr(model, "base_model", None), "model", model)
        cfg.base_model_name_or_path = getattr(inner, "name_or_path", None) or None
    cfg.inference_mode = True
    with tempfile.TemporaryDirectory(prefix="ckptio-peft-") as tmp:
        cfg.save_pretrained(tmp)
        with open(os.path.join(tmp, ADAPTER_CONFIG), "rb") as f:
            return f.read()


def adapter_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """``adapter_model.safetensors`` content: contiguous, unshared CPU copies, PEFT's metadata."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return safetensors.torch.save(clean, metadata={"format": "pt"})


def _copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter that may be a DTensor shard, without communication
    (every rank holds the whole tensor, so each one cuts its own shard)."""
    if isinstance(dst, DTensor):
        local = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(local.to_local())
    else:
        if dst.shape != full.shape:
            raise StateMismatchError(
                f"adapter tensor of shape {tuple(full.shape)} does not fit {tuple(dst.shape)}"
            )
        dst.copy_(full)


@dataclass
class AdapterLoadResult:
    """What :func:`load_adapter` did: on-disk keys loaded, and the model's adapter keys not found."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def read_adapter(backend: Backend, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (legacy DoRA names normalised) and config of the adapter stored in directory ``path``."""
    wpath = backend.join(path, ADAPTER_WEIGHTS)
    if not backend.exists(wpath):
        raise CheckpointNotFoundError(
            f"no {ADAPTER_WEIGHTS} at {backend.url(path)}: save with addons=['peft'] or peft's save_pretrained, "
            "or pass subdir= where the adapter lies"
        )
    tensors = safetensors.torch.load(backend.read_bytes(wpath))
    normalised: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        normalised[ckptio_dora.to_hf_key(k) if "lora_magnitude" in k else k] = v
    cpath = backend.join(path, ADAPTER_CONFIG)
    config = json.loads(backend.read_bytes(cpath)) if backend.exists(cpath) else {}
    return normalised, config


#: A safetensors header is a few MB at most for an adapter; a larger length means a damaged file.
_MAX_HEADER = 100 << 20


def stored_adapter_keys(backend: Backend, path: str) -> set[str] | None:
    """The tensor names in ``<path>/adapter_model.safetensors`` (its header only), ``None`` when
    there is no such file."""
    wpath = backend.join(path, ADAPTER_WEIGHTS)
    if not backend.exists(wpath):
        return None
    head = backend.read_bytes(wpath, 0, 8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= _MAX_HEADER:
        raise CorruptCheckpointError(
            f"{backend.url(wpath)} is not a safetensors file", path=backend.url(wpath)
        )
    try:
        header = json.loads(backend.read_bytes(wpath, 8, n))
    except ValueError as exc:
        raise CorruptCheckpointError(
            f"{backend.url(wpath)}: unreadable safetensors header ({exc})", path=backend.url(wpath)
        ) from exc
    return {k for k in header if k != "__metadata__"}


def disk_name(disk: str, stored: set[str], adapter_name: str = DEFAULT_ADAPTER) -> str:
    """The name under which ``stored`` holds the tensor whose current on-disk name is ``disk``:
    ``disk`` itself, or for a DoRA magnitude its legacy form ``...lora_magnitude_vector.<adapter>.weight``
    (older PEFT releases)."""
    if disk in stored or not disk.endswith(ckptio_dora.HF_SUFFIX):
        return disk
    for candidate in (ckptio_dora.legacy_key(disk, adapter_name), ckptio_dora.legacy_key(disk)):
        if candidate in stored:
            return candidate
    return disk


def load_adapter(
    model: torch.nn.Module,
    url: str,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    subdir: str = "",
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> AdapterLoadResult:
    """Load an adapter directory (written by ckptio's ``peft`` addon or by PEFT's ``save_pretrained``,
    on any backend) into ``model`` in place.

    The model must already carry the adapter's layers (``get_peft_model(base, config)``). Works
    for FSDP2-sharded models: every rank reads the (small) file and cuts its own shard of each
    tensor, with no collective. With ``strict``, adapter weights the file lacks, or file entries the
    model has no place for, raise :class:`~ckptio.StateMismatchError`.
    """
    u, backend = open_backend(url, storage_options)
    path = backend.join(u.path, subdir) if subdir else u.path
    tensors, config = read_adapter(backend, path)
    keys = list(get_model_state_dict(model).keys())
    names = adapter_names(model, keys, adapter_name)
    inverse = {disk: mem for mem, disk in names.items()}
    unexpected = sorted(k for k in tensors if k not in inverse)
    missing = sorted(k for k in inverse if k not in tensors)
    if strict and (unexpected or missing):
        raise StateMismatchError(
            f"adapter at {backend.url(path)} does not fit the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]} (is the PEFT config the same? pass strict=False to load what fits)"
        )
    inner = unwrap(model)
    targets: dict[str, torch.Tensor] = {
        canonical_name(n): t for n, t in inner.named_parameters(remove_duplicate=False)
    }
    targets.update((canonical_name(n), t) for n, t in inner.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for disk in sorted(k for k in tensors if k in inverse):
            _copy_full_into(targets[inverse[disk]], tensors[disk])
    loaded = sorted(k for k in tensors if k in inverse)
    return AdapterLoadResult(loaded=loaded, missing=missing, unexpected=unexpected, config=config)
