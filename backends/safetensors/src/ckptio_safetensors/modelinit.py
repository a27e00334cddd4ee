"""Preparing a model to be filled by a load: meta-device materialisation, stored dtypes.

A model built under ``torch.device("meta")`` (and possibly ``fully_shard``-ed) has no memory.
:func:`materialize` gives it some, the way torch recommends (``module.to_empty(device=...)``): an
FSDP2 model allocates only each rank's local shards, so a rank never holds more than its share.
The load then fills every parameter and persistent buffer.

What a load cannot fill stays the model's business:

* **non-persistent buffers** (rotary ``inv_freq``, causal masks...) are not in any checkpoint.
  A buffer that was on the meta device is filled with NaN (integers: 0) so that forgetting it
  shows at once; recompute it after the load, e.g. :func:`reset_non_persistent_buffers` for
  transformers models, or build the model with its buffers on a real device. Buffers that were
  already real are kept as they were.
* keys the checkpoint does not have (``strict=False``) are left uninitialised.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections import defaultdict
from typing import Any

import torch
from ckptio.errors import StateMismatchError
from torch.distributed.tensor import DTensor

#: Wrapper names that ``get_model_state_dict`` removes from FQNs (compile, activation checkpointing, DDP).
_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module")


def _clean(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPERS)


def _owners(model: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Module, str, bool]]]:
    """State-dict name -> every ``(module, attribute, is_parameter)`` that holds it."""
    out: dict[str, list[tuple[torch.nn.Module, str, bool]]] = defaultdict(list)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                out[_clean(f"{mod_name}.{attr}" if mod_name else attr)].append((mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None:
                out[_clean(f"{mod_name}.{attr}" if mod_name else attr)].append((mod, attr, False))
    return out


def has_meta(model: torch.nn.Module) -> bool:
    return any(_local(t).is_meta for t in model.parameters()) or any(
        _local(t).is_meta for _, t in _persistent_buffers(model)
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mod_name, mod in model.named_modules():
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{attr}" if mod_name else attr, b))
    return out


_PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux 5.14
#: below this a tensor's pages are left to fault as the load writes them
PREFAULT_MIN_BYTES = 1 << 20
_PREFAULT_PIECE = 16 << 20
_libc: Any = None


def prefault(tensors: list[torch.Tensor], threads: int | None = None) -> threading.Thread | None:
    """Map the pages of fresh, never-written CPU tensors in the background; returns the thread
    that waits for the workers (``None`` when there was nothing to do or it is not supported).

    A meta-device model's memory comes from ``torch.empty``: nothing is written until the load
    fills it, so every 4 KiB page faults the first time the load writes it, in the reader threads
    (about half a second of kernel time per GB here: allocating and zeroing pages, not copying).
    ``MADV_POPULATE_WRITE`` maps the same pages in one call per piece, cheaper than a fault per
    page, and does it while the caller's thread plans the load (transformers' conversion mapping,
    DCP planning: Python that holds the GIL; ``madvise`` through ctypes releases it). Pages the
    reads reach first fault as before. Populating never changes a page's contents, so it races
    with nothing. Where the call is unsupported, nothing happens.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    spans: list[tuple[int, int]] = []
    keep = []
    for t in tensors:
        if t.device.type != "cpu" or t.untyped_storage().nbytes() < PREFAULT_MIN_BYTES:
            continue
        storage = t.untyped_storage()
        ptr, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        start = -(-ptr // _PAGE) * _PAGE  # whole pages of the tensor's own memory only
        end = end // _PAGE * _PAGE
        for a in range(start, end, _PREFAULT_PIECE):
            spans.append((a, min(end, a + _PREFAULT_PIECE) - a))
        keep.append(storage)  # alive until populated
    if not spans:
        return None
    try:
        if _libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _libc = libc
    except (OSError, AttributeError):
        return None
    if threads is None:
        from ckptio.ext import default_thread_count

        threads = default_thread_count(4)
    lock = threading.Lock()
    todo = iter(spans)

    def work() -> None:
        while True:
            with lock:
                span = next(todo, None)
            if span is None:
                return
            if _libc.madvise(span[0], span[1], _MADV_POPULATE_WRITE) != 0:
                return  # EINVAL (an old kernel), ENOMEM...: the reads fault the pages themselves

    workers = [
        threading.Thread(target=work, name=f"ckptio-prefault-{i}", daemon=True) for i in range(threads)
    ]
    for w in workers:
        w.start()

    def join() -> None:
        for w in workers:
            w.join()
        keep.clear()

    waiter = threading.Thread(target=join, name="ckptio-prefault", daemon=True)
    waiter.start()
    return waiter


def default_device(model: torch.nn.Module) -> torch.device:
    """The device type of the model's DTensor mesh (``cuda`` under FSDP2 on GPUs), else CPU."""
    for p in model.parameters():
        if isinstance(p, DTensor):
            kind = p.device_mesh.device_type
            if kind == "cuda" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device(kind)
    return torch.device("cpu")


def materialize(model: torch.nn.Module, device: str | torch.device | None = None) -> bool:
    """Give a meta-device model memory on ``device`` (default :func:`default_device`); returns
    whether anything was materialised. Tied parameters stay one ``Parameter``; tensors that were
    already real keep their values; non-persistent buffers that were on meta are filled with NaN
    (see the module docstring)."""
    if not has_meta(model):
        return False
    dev = torch.device(device) if device is not None else default_device(model)
    ties: dict[int, list[tuple[torch.nn.Module, str]]] = defaultdict(list)
    keep: list[tuple[torch.nn.Module, str, torch.Tensor, bool]] = []
    fresh_buffers: list[tuple[torch.nn.Module, str]] = []
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is None:
                continue
            ties[id(p)].append((mod, attr))
            if not _local(p).is_meta:
                if isinstance(p, DTensor):
                    raise StateMismatchError(
                        f"cannot materialise a model whose DTensor parameters are partly on the meta device "
                        f"({attr} of {type(mod).__name__} is not): build it wholly on meta, or materialise it yourself"
                    )
                keep.append((mod, attr, p.detach(), True))
        for attr, b in mod._buffers.items():
            if b is None:
                continue
            if b.is_meta:
                if attr in mod._non_persistent_buffers_set:
                    fresh_buffers.append((mod, attr))
            else:
                keep.append((mod, attr, b, False))
    with torch.no_grad():
        model.to_empty(device=dev)
        if dev.type == "cpu":
            prefault([_local(p) for p in model.parameters()] + [b for _, b in _persistent_buffers(model)])
        for group in ties.values():
            if len(group) > 1:  # a plain module's _apply makes one new Parameter per owner
                first = getattr(group[0][0], group[0][1])
                for mod, attr in group[1:]:
                    if getattr(mod, attr) is not first:
                        mod._parameters[attr] = first
        for mod, attr, value, is_param in keep:
            if is_param:
                getattr(mod, attr).data = value.to(dev)
            else:
                mod._buffers[attr] = value.to(dev)
        for mod, attr in fresh_buffers:
            b = mod._buffers[attr]
            assert b is not None
            b.fill_(math.nan) if b.is_floating_point() else b.zero_()
    return True


def adopt_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> list[str]:
    """``dtype_policy="keep"``: each floating parameter or buffer named in ``dtypes`` (state-dict
    names) whose dtype differs gets new (uninitialised) data of that dtype, on its device, in
    the same ``Parameter`` object (so ties and references hold). Returns the names changed."""
    owners = _owners(model)
    changed = []
    with torch.no_grad():
        for name, dtype in dtypes.items():
            for mod, attr, is_param in owners.get(name, []):
                t = getattr(mod, attr)
                if t.dtype == dtype or not (t.dtype.is_floating_point and dtype.is_floating_point):
                    continue
                if isinstance(t, DTensor):
                    raise StateMismatchError(
                        f"dtype_policy='keep' cannot change the dtype of the sharded parameter {name!r} "
                        f"({t.dtype} -> {dtype}): FSDP2 fixes dtypes at fully_shard. Build the model in "
                        f"{dtype} before sharding it, or load with dtype_policy='cast'",
                        mismatched=[name],
                    )
                new = torch.empty(t.shape, dtype=dtype, device=t.device)
                if is_param:
                    t.data = new
                else:
                    mod._buffers[attr] = new
                changed.append(name)
    return changed


def reset_non_persistent_buffers(model: torch.nn.Module) -> int:
    """Recompute the non-persistent buffers of a transformers model with transformers' own
    initialisation (``_init_weights`` of the enclosing ``PreTrainedModel``), for the modules that
    hold such buffers and no parameters (rotary embeddings); returns how many were reset. Call it
    after loading into a model built on the meta device. Other models: recompute them yourself."""
    from transformers import PreTrainedModel

    count = 0

    def walk(mod: torch.nn.Module, owner: Any) -> None:
        nonlocal count
        if isinstance(mod, PreTrainedModel):
            owner = mod
        for child in mod.children():
            walk(child, owner)
        own_params = [p for p in mod._parameters.values() if p is not None]
        if owner is not None and mod._non_persistent_buffers_set and not own_params:
            with torch.no_grad():
                owner._init_weights(mod)
            count += 1

    walk(model, None)
    return count


__all__ = ["adopt_dtypes", "default_device", "has_meta", "materialize", "reset_non_persistent_buffers"]
