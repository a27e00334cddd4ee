"""Transformers' checkpoint conversion mapping, as byte ranges: fused in memory, per-module on disk.

transformers 5 keeps some weights in memory in another layout than on disk: a Mixtral or Qwen3-MoE
layer holds ``mlp.experts.gate_up_proj`` (experts x 2*inter x hidden) and ``mlp.experts.down_proj``
while the files (and every ``save_pretrained`` directory) hold ``experts.<e>.gate_proj.weight``,
``up_proj`` and ``down_proj`` one by one, and Mixtral's are also renamed (``block_sparse_moe`` ->
``mlp``, ``w1``/``w3``/``w2``). ``from_pretrained`` applies the model's conversion list
(:func:`transformers.conversion_mapping.get_model_conversion_mapping`: ``WeightRenaming`` and
``WeightConverter`` with ops such as ``MergeModulelist`` and ``Concatenate``) and
``save_pretrained`` reverses it (``revert_weight_conversion``).

ckptio uses that same list, with no model names of its own, and never runs the ops on data.
The names come from transformers' own ``rename_source_key``; the ops are run *symbolically*, on
descriptions of where each stored tensor lands:

* **load**: each stored tensor becomes one chunk (or, after a split, several) of the in-memory
  tensor, at the offsets the op would have put it. Stacking inserts a unit dimension and
  concatenation shifts offsets, so an expert's ``gate_proj`` is the contiguous chunk
  ``[e, 0:inter, :]`` of ``gate_up_proj`` and its bytes are read straight from the file into
  it. DCP then plans the load as for any sharded checkpoint: an FSDP2 rank that holds experts
  4-7 reads those experts' bytes and nothing else, and no merged tensor is ever built in memory.
  Ops that do not reorder bytes (``MergeModulelist``, ``Concatenate``, ``Chunk``, ``Split``,
  ``SplitModulelist``) and ``Transpose`` (read band by band) are supported; any other op is an
  error naming it.
* **export** (:func:`hf_source_view` for ``consolidate``, :func:`hf_tensors` for
  ``write_hf_checkpoint``): ``revert_weight_conversion`` run on meta tensors gives the on-disk
  names and shapes, the load plan of those names says which region of which in-memory tensor
  each one is, and each exported tensor is read (or viewed) from that region alone.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from ckptio.errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger("ckptio.safetensors")

#: The transformers ops whose effect is a placement of bytes (see the module docstring).
SUPPORTED_OPS = ("MergeModulelist", "Concatenate", "Chunk", "Split", "SplitModulelist", "Transpose")


class ConversionError(CheckpointError):
    """A transformers conversion that ckptio cannot express as byte ranges, or that does not fit."""


@dataclass(frozen=True)
class Stored:
    """A tensor as stored: its name (after the user's ``key_mapping``), shape, dtype and bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""
    pos: int = 0


@dataclass(frozen=True)
class Piece:
    """A box of a stored tensor placed in an in-memory tensor.

    ``sel`` is the box in the stored tensor (``(start, length)`` per stored dimension); ``axes``
    says, for each dimension of the in-memory tensor, which stored dimension it runs along
    (``None``: a unit dimension the op inserted; stored dimensions not named have length 1);
    ``offsets`` is where the box starts in the in-memory tensor.
    """

    src: Stored
    sel: tuple[tuple[int, int], ...]
    axes: tuple[int | None, ...]
    offsets: tuple[int, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(1 if a is None else self.sel[a][1] for a in self.axes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def contiguous_range(self) -> tuple[int, int] | None:
        """``(byte offset from the stored tensor's start, length)`` when the piece is one run of
        bytes laid out as its own row-major shape (no reordering), else ``None``."""
        mapped = [a for a in self.axes if a is not None]
        if mapped != sorted(mapped) or len(set(mapped)) != len(mapped):
            return None
        return _box_range(self.src.shape, self.sel, self.src.dtype.itemsize)


def _box_range(
    shape: tuple[int, ...], sel: tuple[tuple[int, int], ...], itemsize: int
) -> tuple[int, int] | None:
    """The byte range of box ``sel`` in a row-major tensor of ``shape`` when it is contiguous."""
    n = len(shape)
    partial = [d for d in range(n) if sel[d] != (0, shape[d])]
    if partial:
        k = partial[-1]
        if any(sel[d][1] != 1 for d in range(k)):  # before the last partial dim only single indices
            return None
    strides = [math.prod(shape[d + 1 :]) for d in range(n)]
    start = sum(s * st for (s, _), st in zip(sel, strides))
    return start * itemsize, math.prod(ln for _, ln in sel) * itemsize


@dataclass
class Sym:
    """An in-memory tensor described by the stored boxes it is made of."""

    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @classmethod
    def of(cls, src: Stored) -> Sym:
        nd = len(src.shape)
        return cls(src.shape, [Piece(src, tuple((0, s) for s in src.shape), tuple(range(nd)), (0,) * nd)])


def _stack(items: list[Sym], dim: int) -> Sym:
    if not items:
        raise ConversionError("nothing to stack")
    shape = items[0].shape
    if any(t.shape != shape for t in items):
        raise ConversionError(f"cannot stack tensors of shapes {sorted({t.shape for t in items})}")
    nd = len(shape) + 1
    dim = dim % nd
    pieces = [
        Piece(p.src, p.sel, p.axes[:dim] + (None,) + p.axes[dim:], p.offsets[:dim] + (i,) + p.offsets[dim:])
        for i, t in enumerate(items)
        for p in t.pieces
    ]
    return Sym(shape[:dim] + (len(items),) + shape[dim:], pieces)


def _cat(items: list[Sym], dim: int) -> Sym:
    if not items:
        raise ConversionError("nothing to concatenate")
    nd = len(items[0].shape)
    dim = dim % nd
    rest = {t.shape[:dim] + t.shape[dim + 1 :] for t in items}
    if len(rest) != 1 or any(len(t.shape) != nd for t in items):
        raise ConversionError(f"cannot concatenate tensors of shapes {[t.shape for t in items]} along {dim}")
    pieces, at = [], 0
    for t in items:
        for p in t.pieces:
            off = list(p.offsets)
            off[dim] += at
            pieces.append(Piece(p.src, p.sel, p.axes, tuple(off)))
        at += t.shape[dim]
    shape = list(items[0].shape)
    shape[dim] = at
    return Sym(tuple(shape), pieces)


def _narrow(t: Sym, dim: int, start: int, length: int) -> Sym:
    dim = dim % len(t.shape)
    end = start + length
    pieces = []
    for p in t.pieces:
        size = p.sizes[dim]
        lo, hi = max(p.offsets[dim], start), min(p.offsets[dim] + size, end)
        if hi <= lo:
            continue
        sel = list(p.sel)
        a = p.axes[dim]
        if a is not None:
            s0, _ = sel[a]
            sel[a] = (s0 + lo - p.offsets[dim], hi - lo)
        off = list(p.offsets)
        off[dim] = lo - start
        pieces.append(Piece(p.src, tuple(sel), p.axes, tuple(off)))
    shape = list(t.shape)
    shape[dim] = length
    return Sym(tuple(shape), pieces)


def _split(t: Sym, sizes: Iterable[int], dim: int) -> list[Sym]:
    out, at = [], 0
    for n in sizes:
        out.append(_narrow(t, dim, at, n))
        at += n
    return out


def _squeeze(t: Sym, dim: int) -> Sym:
    dim = dim % len(t.shape)
    if t.shape[dim] != 1:
        return t
    pieces = [
        Piece(p.src, p.sel, p.axes[:dim] + p.axes[dim + 1 :], p.offsets[:dim] + p.offsets[dim + 1 :])
        for p in t.pieces
    ]
    return Sym(t.shape[:dim] + t.shape[dim + 1 :], pieces)


def _transpose(t: Sym, d0: int, d1: int) -> Sym:
    nd = len(t.shape)
    d0, d1 = d0 % nd, d1 % nd

    def swap(x: tuple[Any, ...]) -> tuple[Any, ...]:
        y = list(x)
        y[d0], y[d1] = y[d1], y[d0]
        return tuple(y)

    return Sym(swap(t.shape), [Piece(p.src, p.sel, swap(p.axes), swap(p.offsets)) for p in t.pieces])


def _chunk_sizes(n: int, chunks: int) -> list[int]:
    """The sizes ``torch.chunk`` gives (it may return fewer chunks than asked)."""
    return [int(x.shape[0]) for x in torch.chunk(torch.empty(n, device="meta"), chunks)]


# -- the ops, run on descriptions ---------------------------------------------------------------
def _one(input_dict: Mapping[str, Any]) -> Sym:
    if len(input_dict) != 1:
        raise ConversionError("undefined operation: several inputs to a one-input op")
    v = next(iter(input_dict.values()))
    return v[0] if isinstance(v, list) else v


def _run_op(
    op: Any,
    input_dict: dict[str, Any],
    source_patterns: list[str],
    target_patterns: list[str],
    layer_name: str,
    model: Any,
    dest_shape: Callable[[str], tuple[int, ...] | None],
) -> dict[str, Any]:
    """What ``op.convert`` would return, on :class:`Sym` descriptions instead of tensors."""
    kind = type(op).__name__
    if kind == "MergeModulelist":
        size = len(input_dict)
        merged: dict[str, Any] = {}
        for sp in list(input_dict):
            tensors = input_dict.pop(sp)
            tp = op.get_target_pattern(size, sp, target_patterns)
            merged[tp] = tensors if isinstance(tensors, Sym) else _stack(list(tensors), op.dim)
        return merged
    if kind == "Concatenate":
        tp = op.get_target_pattern(target_patterns)
        items: list[Sym] = []
        for sp in source_patterns:
            if sp not in input_dict:
                continue
            v = input_dict.pop(sp)
            items.extend(v if isinstance(v, list) else [v])
        return {tp: _cat(items, op.dim)}
    if kind == "Chunk":
        t = _one(input_dict)
        targets = op.get_target_patterns(target_patterns, config=getattr(model, "config", None))
        return dict(zip(targets, _split(t, _chunk_sizes(t.shape[op.dim], len(targets)), op.dim)))
    if kind == "Split":
        t = _one(input_dict)
        sizes = []
        for target in target_patterns:
            shape = dest_shape(layer_name.replace(target_patterns[0], target))
            if shape is None:
                raise ConversionError(
                    f"Split: the model has no {layer_name.replace(target_patterns[0], target)!r}"
                )
            sizes.append(shape[op.dim])
        return dict(zip(target_patterns, _split(t, sizes, op.dim)))
    if kind == "SplitModulelist":
        out: dict[str, Any] = {}
        for sp, v in input_dict.items():
            t = v[0] if isinstance(v, list) else v
            n = t.shape[op.dim]
            targets = op.get_target_patterns(input_dict, sp, target_patterns, n)
            out.update({tg: _squeeze(c, op.dim) for tg, c in zip(targets, _split(t, [1] * n, op.dim))})
        return out
    if kind == "Transpose":
        tp = op.get_target_pattern(input_dict, source_patterns, target_patterns)
        t = _one(input_dict)
        if op.check_dims and dest_shape(layer_name) == t.shape:
            return {tp: t}
        return {tp: _transpose(t, op.dim0, op.dim1)}
    raise ConversionError(
        f"transformers conversion op {kind} (for {layer_name!r}) is not supported by ckptio's ranged loader "
        f"(supported: {', '.join(SUPPORTED_OPS)}); load this model with from_pretrained, or pass "
        "hf_conversion=False with a key_mapping"
    )


def _expand_names(layer_name: str, collected: dict[str, Any]) -> dict[str, Any]:
    """``WeightConverter.convert``'s last step: target patterns -> full names."""
    full = layer_name.replace("*.", "0.") if "*." in layer_name else layer_name
    for k in collected:
        if k in full:
            prefix, _, suffix = full.partition(k)
            return {prefix + t + suffix: v for t, v in collected.items()}
    return collected


def is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def load_plan(model: Any, stored: Iterable[Stored], dest: Mapping[str, tuple[int, ...]]) -> dict[str, Sym]:
    """Where every stored tensor goes, as ``{in-memory name: Sym}``.

    ``model`` is a transformers ``PreTrainedModel`` (its conversion list is used) or anything else
    (names are kept). ``dest`` maps the model's state-dict names to their shapes; names that
    fit no destination are kept as stored (they are the load's unexpected keys).
    """
    stored = list(stored)
    if not is_transformers_model(model):
        return {s.name: Sym.of(s) for s in stored}
    from transformers import conversion_mapping
    from transformers.conversion_mapping import get_model_conversion_mapping

    if (
        stored
        and all(dest.get(s.name) == tuple(s.shape) for s in stored)
        and not getattr(conversion_mapping, "USER_REGISTERED_MAPPINGS", True)
    ):
        # Every stored tensor already is a destination of its shape (save_pretrained of a model
        # whose layout needs no conversion): a conversion could only move one onto another's
        # name, so names are kept, without building transformers' mapping for every model type
        # (its first use in a process costs ~0.1 s of regex compiling).
        return {s.name: Sym.of(s) for s in stored}
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    meta = dict(dest)

    out: dict[str, Sym] = {}
    groups: dict[str, tuple[Any, dict[str, list[Sym]]]] = {}
    for s in sorted(stored, key=lambda s: dot_natural_key(s.name)):
        renamed, pattern = rename_source_key(s.name, renamings, converters, prefix, meta)
        if renamed not in meta and s.name in meta:
            renamed, pattern = rename_source_key(
                s.name, [], [], base_model_prefix=prefix, meta_state_dict=meta
            )
        if renamed in meta and pattern is not None:
            conv, collected = groups.setdefault(renamed, (deepcopy(by_pattern[pattern]), {}))
            collected.setdefault(pattern, []).append(Sym.of(s))
        elif pattern is not None:
            _put(out, s.name, Sym.of(s))  # a converter's source the model does not have: unexpected as stored
        else:
            _put(out, renamed, Sym.of(s))
    for layer_name, (conv, collected) in groups.items():
        values: dict[str, Any] = dict(collected)
        for op in conv.operations:
            values = _run_op(
                op, values, conv.source_patterns, conv.target_patterns, layer_name, model, meta.get
            )
        for name, v in _expand_names(layer_name, values).items():
            if isinstance(v, list):
                if len(v) != 1:
                    raise ConversionError(f"conversion for {name!r} left {len(v)} tensors, not one")
                v = v[0]
            _put(out, name, v)
    return out


def _put(out: dict[str, Sym], name: str, sym: Sym) -> None:
    if name in out:
        raise ConversionError(f"two stored tensors map to {name!r}")
    out[name] = sym


# -- export: in-memory names -> on-disk names ---------------------------------------------------
def model_for(obj: Any) -> Any:
    """A transformers model to take the conversion list from: ``obj`` itself, or a model built on
    the meta device (no memory) from a config: a ``PretrainedConfig``, a config dict, the bytes of
    a ``config.json``, or a local directory or ``config.json`` path."""
    if isinstance(obj, torch.nn.Module):
        return obj
    import json

    import transformers

    config = obj
    if isinstance(obj, (bytes, bytearray)):
        obj = json.loads(obj)
    if isinstance(obj, dict):
        d = dict(obj)
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    elif isinstance(obj, str):
        config = transformers.AutoConfig.from_pretrained(obj, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ExportPart:
    """Part of an on-disk tensor: a box of an in-memory tensor (see :class:`Piece`, reversed)."""

    source: str  # in-memory name
    offsets: tuple[int, ...]  # of the box in the in-memory tensor
    sizes: tuple[int, ...]
    sel: tuple[tuple[int, int], ...]  # where it lands in the on-disk tensor
    axes: tuple[int | None, ...]


def export_plan(
    model: Any, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, tuple[tuple[int, ...], torch.dtype, list[ExportPart]]] | None:
    """``{on-disk name: (shape, dtype, parts)}`` for in-memory tensors ``{name: (shape, dtype)}``,
    or ``None`` when there is no model or its conversions change nothing (names as they are)."""
    if model is None:
        return None
    model = model_for(model)
    if not is_transformers_model(model):
        return None
    from transformers.core_model_loading import revert_weight_conversion

    fake = {n: torch.empty(shape, dtype=dt, device="meta") for n, (shape, dt) in tensors.items()}
    try:
        reverted = revert_weight_conversion(model, fake)
    except Exception as exc:
        raise ConversionError(
            f"transformers could not reverse the conversion of {type(model).__name__}: {exc}"
        ) from exc
    if set(reverted) == set(tensors) and all(tuple(reverted[n].shape) == tensors[n][0] for n in tensors):
        return None
    stored = [Stored(n, tuple(t.shape), t.dtype) for n, t in reverted.items()]
    plan = load_plan(model, stored, {n: s for n, (s, _) in tensors.items()})
    missing = sorted(set(tensors) - set(plan))
    if missing:
        raise ConversionError(f"the reversed conversion does not cover {missing[:5]}")
    shapes = {s.name: s.shape for s in stored}
    out: dict[str, tuple[tuple[int, ...], torch.dtype, list[ExportPart]]] = {}
    for name, sym in plan.items():
        if name not in tensors:
            raise ConversionError(f"the reversed conversion produced {name!r}, which the model does not have")
        if sym.shape != tensors[name][0]:
            raise ConversionError(
                f"{name!r}: conversion gives {list(sym.shape)}, the tensor is {list(tensors[name][0])}"
            )
        for p in sym.pieces:
            entry = out.setdefault(p.src.name, (shapes[p.src.name], tensors[name][1], []))
            entry[2].append(ExportPart(name, p.offsets, p.sizes, p.sel, p.axes))
    return out


def hf_tensors(
    state_dict: Mapping[str, torch.Tensor], model: Any = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """On-disk names -> ``(shape, dtype, function giving the tensor)``: views of ``state_dict``
    where possible (one expert of a fused tensor is a view of it); a tensor made of several boxes
    is built when its function is called, so only one such copy exists at a time."""
    plan = export_plan(model, {n: (tuple(t.shape), t.dtype) for n, t in state_dict.items()})
    if plan is None:
        return {n: (tuple(t.shape), t.dtype, functools.partial(_same, t)) for n, t in state_dict.items()}
    return {
        name: (shape, dtype, functools.partial(_gather, state_dict, shape, dtype, parts))
        for name, (shape, dtype, parts) in plan.items()
    }


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _box_view(t: torch.Tensor, part: ExportPart) -> torch.Tensor:
    """The on-disk-ordered view of ``part`` of in-memory tensor ``t``."""
    v = t
    for d, (o, n) in enumerate(zip(part.offsets, part.sizes)):
        v = v.narrow(d, o, n)
    mapped = [a for a in part.axes if a is not None]
    drop = [d for d, a in enumerate(part.axes) if a is None]
    for d in reversed(drop):
        v = v.squeeze(d)
    order = sorted(range(len(mapped)), key=lambda i: mapped[i])
    v = v.permute(*order) if order != list(range(len(mapped))) else v
    # stored dimensions the op squeezed away come back as unit dimensions
    for a in range(len(part.sel)):
        if a not in mapped:
            v = v.unsqueeze(a)
    return v


def _gather(
    state_dict: Mapping[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    parts: list[ExportPart],
) -> torch.Tensor:
    if len(parts) == 1 and parts[0].sel == tuple((0, s) for s in shape):
        return _box_view(state_dict[parts[0].source], parts[0])
    first = state_dict[parts[0].source]
    out = torch.empty(shape, dtype=dtype, device=first.device)
    for part in parts:
        region = out
        for d, (o, n) in enumerate(part.sel):
            region = region.narrow(d, o, n)
        region.copy_(_box_view(state_dict[part.source], part))
    return out


def hf_source_view(src: Any, model: Any) -> Any:
    """A consolidation source (``consolidation.Source``) seen with on-disk names: each exported
    tensor is made of byte ranges of the stored chunks of the in-memory tensors it comes from, so
    ``consolidate`` assembles one expert at a time, reading only its bytes. A part of a chunk
    cannot be checked against the chunk's checksum: the view's ``cut`` names, per exported
    tensor, the stored chunks it is cut from, which :func:`verify_cut` checks whole (each rank
    the ones its own output files use)."""
    import dataclasses

    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from .consolidation import SourceTensor
    from .format import Chunk

    if model is None:
        return src
    if not isinstance(model, torch.nn.Module):
        try:
            model = model_for(model)
        except Exception as exc:  # no transformers, or a config it cannot build: names as they are
            log.warning(
                "not applying a transformers conversion to the export (%s: %s)", type(exc).__name__, exc
            )
            return src
    tensors = {n: (tuple(st.meta.size), st.meta.properties.dtype) for n, st in src.tensors.items()}
    plan = export_plan(model, tensors)
    if plan is None:
        return src
    cut: dict[str, dict[tuple[str, tuple[int, ...] | None], Any]] = {}
    new: dict[str, Any] = {}
    for name, (shape, dtype, parts) in plan.items():
        chunks: list[Any] = []
        for part in parts:
            mapped = [a for a in part.axes if a is not None]
            if mapped != sorted(mapped):
                raise ConversionError(
                    f"exporting {name!r} needs a transpose, which ckptio's exporter cannot do"
                )
            for c in src.tensors[part.source].chunks:
                for box_in_chunk, box_out in _intersect(part, c):
                    rng = _box_range(tuple(c.sizes), box_in_chunk, dtype.itemsize)
                    assert rng is not None
                    whole = rng[1] == c.length and isinstance(c.xxh3, str)
                    if not whole:  # checked as a whole first (see the docstring)
                        cut.setdefault(name, {})[(c.fqn, c.offsets)] = c
                    offsets = tuple(st for st, _ in box_out)
                    sizes = tuple(n for _, n in box_out)
                    xxh3 = c.xxh3 if whole else None
                    chunks.append(Chunk(name, offsets, sizes, dtype, c.file, c.pos + rng[0], rng[1], xxh3))
        meta = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(shape),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in chunks
            ],
        )
        new[name] = SourceTensor(meta, chunks)
    used = {p.source for _, _, parts in plan.values() for p in parts}
    for name, st in src.tensors.items():
        if name not in used and name not in new:
            new[name] = st
    return dataclasses.replace(src, tensors=new, cut=cut)


def verify_cut(src: Any, names: Iterable[str]) -> None:
    """Check whole, once each, the stored chunks that the exported tensors ``names`` of a
    :func:`hf_source_view` are cut from (one streaming pass over each); raises
    :class:`CorruptCheckpointError` on a mismatch. A rank of a distributed export checks the
    chunks its own files use, so the work is split as the files are."""
    chunks: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for name in names:
        chunks.update(src.cut.get(name, {}))
    _verify_whole(src, chunks)


def _intersect(
    part: ExportPart, c: Any
) -> Iterable[tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]]:
    """The contiguous runs of (``part``'s box in the in-memory tensor) ∩ (stored chunk ``c``), each
    as (box inside the chunk, box in the on-disk tensor)."""
    nd = len(part.offsets)
    lo = [max(part.offsets[d], c.offsets[d]) for d in range(nd)]
    hi = [min(part.offsets[d] + part.sizes[d], c.offsets[d] + c.sizes[d]) for d in range(nd)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    inner = [(lo[d] - c.offsets[d], hi[d] - lo[d]) for d in range(nd)]
    partial = [d for d in range(nd) if inner[d] != (0, c.sizes[d])]
    k = partial[-1] if partial else 0
    # every index combination of the dimensions before the last partial one is one run
    for idx in itertools.product(*(range(inner[d][0], inner[d][0] + inner[d][1]) for d in range(k))):
        box = tuple((i, 1) for i in idx) + tuple(inner[k:])
        out = list(part.sel)
        for d, a in enumerate(part.axes):
            if a is None:
                continue
            start = c.offsets[d] + box[d][0] - part.offsets[d]
            out[a] = (part.sel[a][0] + start, box[d][1])
        yield box, tuple(out)


def _verify_whole(src: Any, chunks: Mapping[tuple[str, tuple[int, ...] | None], Any]) -> None:
    import xxhash

    from .format import _VERIFY_PIECE

    for key, c in sorted(chunks.items(), key=lambda kv: (kv[1].file, kv[1].pos)):
        expected = c.xxh3 or src.native_hashes.get(key)
        if expected is None:
            continue
        fpath = src.backend.join(src.path, c.file)
        if isinstance(expected, str):
            h = xxhash.xxh3_64()
            for off in range(0, c.length, _VERIFY_PIECE):
                h.update(src.backend.read_bytes(fpath, c.pos + off, min(_VERIFY_PIECE, c.length - off)))
            ok = h.hexdigest() == expected
        else:
            from ckptio.ext import CHECKSUM_BLOCK

            block = CHECKSUM_BLOCK or c.length or 1
            starts = list(range(0, max(1, c.length), block))
            ok = len(starts) == len(expected) and all(
                xxhash.xxh3_64_hexdigest(src.backend.read_bytes(fpath, c.pos + s, min(block, c.length - s)))
                == d
                for s, d in zip(starts, expected)
            )
        if not ok:
            where = src.backend.url(fpath)
            raise CorruptCheckpointError(
                f"checksum mismatch in {where} (tensor {c.fqn!r}): the file is damaged", path=where
            )


__all__ = [
    "ConversionError",
    "ExportPart",
    "Piece",
    "Stored",
    "Sym",
    "export_plan",
    "hf_source_view",
    "hf_tensors",
    "load_plan",
    "model_for",
    "verify_cut",
]
