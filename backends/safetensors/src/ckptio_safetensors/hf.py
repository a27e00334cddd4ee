"""The Hugging Face checkpoint layout: ``model-0000i-of-0000N.safetensors`` + the index.

``model.safetensors.index.json`` is ``{"metadata": {"total_size": N}, "weight_map": {fqn: file}}``;
every file has ``__metadata__ = {"format": "pt"}`` (transformers checks it). The helpers here plan
shards (by size, or mirroring a base model's index), pick each tensor's stored dtype (original
per-tensor dtypes, an optional cast of ordinary float tensors), and write the files through a
:class:`ckptio.Backend`, one tensor at a time, the index last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from ckptio.errors import CheckpointError
from ckptio.ext import Backend

from ._header import HeaderEntry, encode_header, layout, nbytes_of, stream_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
HF_METADATA = {"format": "pt"}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_CASTS = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}
#: The float dtypes a cast may touch; fp8 and packed/quantised types are never cast.
ORDINARY_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (the "5GB" of transformers is also decimal); ``"5GiB"`` binary.

    The bare default of :data:`DEFAULT_MAX_SHARD_SIZE` is 5 GiB, as in the design notes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise CheckpointError(f"shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise CheckpointError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
    return parse_size(int(float(m.group(1)) * _UNITS[m.group(2).upper()]))


def parse_cast(cast: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"``/``torch.bfloat16`` -> dtype; ``None``/``"none"`` -> no cast."""
    if cast is None or isinstance(cast, torch.dtype):
        if cast is not None and cast not in ORDINARY_FLOATS:
            raise CheckpointError(f"cast_dtype must be an ordinary float dtype, got {cast}")
        return cast
    key = str(cast).strip().lower().removeprefix("torch.")
    if key in ("", "none"):
        return None
    if key not in _CASTS:
        raise CheckpointError(f"unknown cast dtype {cast!r}; use one of bf16, fp16, fp32, fp64")
    return _CASTS[key]


def target_dtype(
    name: str, dtype: torch.dtype, dtypes: Mapping[str, torch.dtype] | None, cast: torch.dtype | None
) -> torch.dtype:
    """The dtype ``name`` is stored in.

    An original dtype from ``dtypes`` wins for floating tensors (a weight trained in fp32 but kept
    in bf16 by the base model goes back to bf16; one the base model kept in fp32 stays fp32 even
    when a cast is requested). Otherwise ``cast`` applies to ordinary float tensors only: integer,
    bool and fp8 tensors are never touched.
    """
    if dtypes is not None and name in dtypes:
        orig = dtypes[name]
        if dtype in ORDINARY_FLOATS and orig in ORDINARY_FLOATS:
            return orig
        return dtype
    if cast is not None and dtype in ORDINARY_FLOATS:
        return cast
    return dtype


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_by_size(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Split names (in the given order) into consecutive shards of at most ``max_shard_size``
    bytes; a tensor larger than the limit sits alone, and no shard is empty."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, n in sizes.items():
        if current and used + n > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def reference_file_indices(weight_map: Mapping[str, str]) -> dict[str, int]:
    """File index (1-based) of each file named in a base model's ``weight_map``.

    Indices come from ``-(i)-of-(n).safetensors``; when they are not dense 1..N (e.g. Qwen3.5's
    ``model.safetensors-0000i-of-N`` names, which would otherwise collapse into one file) the files
    are numbered in sorted-name order instead.
    """
    files = sorted(set(weight_map.values()))
    parsed: dict[str, int] = {}
    for f in files:
        m = _SHARD_RE.search(f)
        if m:
            parsed[f] = int(m.group(1))
        elif f == SINGLE_NAME:
            parsed[f] = 1
    if len(parsed) == len(files) and sorted(parsed.values()) == list(range(1, len(files) + 1)):
        return parsed
    return {f: i + 1 for i, f in enumerate(files)}


def plan_from_reference(names: list[str], weight_map: Mapping[str, str]) -> list[list[str]]:
    """Shards mirroring a base model's index; names it does not know go to the last file."""
    idx = reference_file_indices(weight_map)
    n = max(idx.values(), default=1)
    shards: list[list[str]] = [[] for _ in range(n)]
    for name in names:
        f = weight_map.get(name)
        shards[(idx[f] if f is not None else n) - 1].append(name)
    return [s for s in shards if s] or [[]]


@dataclass
class ShardPlan:
    """Output files: ``files[i]`` is the list of tensor names in ``shard_file_name(i+1, N)``."""

    files: list[list[str]]

    @property
    def names(self) -> list[str]:
        n = len(self.files)
        return [shard_file_name(i + 1, n) for i in range(n)]


def make_plan(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    reference_weight_map: Mapping[str, str] | None = None,
) -> ShardPlan:
    """Plan output files for tensors ``{name: (stored dtype, shape)}``."""
    if reference_weight_map:
        return ShardPlan(plan_from_reference(list(specs), reference_weight_map))
    sizes = {name: nbytes_of(dt, shape) for name, (dt, shape) in specs.items()}
    return ShardPlan(plan_by_size(sizes, parse_size(max_shard_size)))


def write_shard(
    backend: Backend,
    path: str,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    names: list[str],
    get_tensor: Callable[[str], torch.Tensor],
) -> int:
    """Stream one HF shard file: the header from ``specs``, then each tensor from ``get_tensor``
    (cast to its planned dtype). Returns the bytes of tensor data written."""
    entries = layout([(n, specs[n][0], specs[n][1]) for n in names])
    header = encode_header(entries, HF_METADATA)

    def fetch(e: HeaderEntry) -> torch.Tensor:
        t = get_tensor(e.name)
        return t if t.dtype == e.dtype else t.to(e.dtype)

    with backend.open_write(path) as f:
        stream_tensors(f, header, entries, fetch, checksums=False)
    return sum(e.nbytes for e in entries)


def index_dict(plan: ShardPlan, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Any]:
    total = sum(nbytes_of(dt, shape) for dt, shape in specs.values())
    weight_map = {name: fname for fname, names in zip(plan.names, plan.files) for name in names}
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def index_bytes(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=2, sort_keys=False) + "\n").encode()


def write_hf_checkpoint(
    state_dict: dict[str, torch.Tensor],
    backend: Backend,
    path: str,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtypes: dict[str, torch.dtype] | None = None,
    cast_dtype: str | torch.dtype | None = None,
    reference_index: Mapping[str, Any] | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Write full (unsharded) tensors as an HF checkpoint directory at ``path`` on ``backend``.

    Files are ``model-0000i-of-0000N.safetensors`` (at most ``max_shard_size`` bytes of tensors
    each, or the layout of ``reference_index``, a base model's parsed index JSON) and
    ``model.safetensors.index.json``, written last so that its presence marks a complete directory.
    Each tensor is converted (dtype, contiguity, device) only when its turn comes, so memory stays
    at about one tensor beyond ``state_dict`` itself.

    :param dtypes: original per-tensor dtypes to restore (see :func:`target_dtype`).
    :param cast_dtype: ``"bf16"``/``"fp16"``/``"fp32"``: cast ordinary float tensors.
    :param model: a transformers model (or its config) whose checkpoint conversion is reversed on
        the way, as ``save_pretrained`` does: fused MoE experts are written one tensor per expert
        (each a view of the fused tensor, converted when its turn comes).
    :returns: the index dict that was written.
    """
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"write_hf_checkpoint takes tensors only; not tensors: {', '.join(bad[:10])}")
    cast = parse_cast(cast_dtype)
    from .conversion import hf_tensors

    tensors = hf_tensors(state_dict, model)  # with a model: its transformers conversion, reversed
    specs = {name: (target_dtype(name, dt, dtypes, cast), shape) for name, (shape, dt, _) in tensors.items()}
    ref_map = reference_index.get("weight_map") if reference_index else None
    plan = make_plan(specs, max_shard_size, ref_map)
    backend.makedirs(path)
    for fname, names in zip(plan.names, plan.files):
        write_shard(backend, backend.join(path, fname), specs, names, lambda n: tensors[n][2]())
    index = index_dict(plan, specs)
    backend.write_bytes(backend.join(path, INDEX_NAME), index_bytes(index))
    return index
