"""PEFT adapter files: which weights are the adapter, their on-disk names, reading them back.

The on-disk convention is HF PEFT's (``save_pretrained`` / ``PeftModel.from_pretrained``):
``adapter_model.safetensors`` keyed ``base_model.model.<fqn>`` *without* the adapter name
(``...q_proj.lora_A.weight``), DoRA magnitudes as ``...q_proj.lora_magnitude_vector`` (see
:mod:`ckptio_dora.names`), next to ``adapter_config.json``.

The names are computed from the model rather than by pattern matching: every PEFT tuner layer
declares the attributes holding its adapter weights (``adapter_layer_names``), and a weight is
the adapter's exactly when it lives under ``<layer>.<attr>.<adapter>``. Models that are not PEFT
models (NeMo AutoModel style, where LoRA modules carry ``lora_`` names and no adapter name) fall
back to "every key containing ``lora_``", prefixed with ``base_model.model.`` on disk.
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
from ckptio.errors import CheckpointError, CheckpointNotFoundError, StateMismatchError
from ckptio.ext import Backend, open_backend
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HF_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"


def is_peft_model(model: Any) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict)


def _tuner_prefixes(model: torch.nn.Module, adapter_name: str) -> tuple[list[str], set[str]]:
    """``<layer>.<attr>.<adapter>`` prefixes holding adapter weights, and the adapted layers' names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefixes: list[str] = []
    layers: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in dict.fromkeys(module.adapter_layer_names):
            holder = getattr(module, attr, None)
            if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and adapter_name in holder:
                prefixes.append(f"{name}.{attr}.{adapter_name}")
                layers.add(name)
    return prefixes, layers


def adapter_names(
    model: torch.nn.Module, keys: list[str], adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, str]:
    """Map the adapter's keys among ``keys`` (in-memory state-dict names) to their on-disk names.

    Keys already renamed by the ``dora`` addon (``<layer>.lora_magnitude_vector``) are recognised.
    """
    if not is_peft_model(model):
        return {k: HF_PREFIX + ckptio_dora.to_hf_key(k) for k in keys if "lora_" in k}
    prefixes, layers = _tuner_prefixes(model, adapter_name)
    out: dict[str, str] = {}
    for key in keys:
        dora_layer = ckptio_dora.module_of(key)
        if dora_layer is not None and dora_layer in layers and ckptio_dora.HF_SUFFIX in key:
            out[key] = ckptio_dora.to_hf_key(key)
            continue
        for p in prefixes:
            if key == p or key.startswith(p + "."):
                out[key] = p[: -len(adapter_name) - 1] + key[len(p) :]
                break
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
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for disk in sorted(k for k in tensors if k in inverse):
            _copy_full_into(targets[inverse[disk]], tensors[disk])
    loaded = sorted(k for k in tensors if k in inverse)
    return AdapterLoadResult(loaded=loaded, missing=missing, unexpected=unexpected, config=config)
