"""DCP planners with ckptio's safety rules.

* Non-tensor values are JSON (:mod:`ckptio.serialization`), never pickle.
* Plain (non-DTensor) values are saved once even when every rank holds them, as DCP does, but
  only after checking that every rank holds the *same* value: DCP would silently keep one rank's
  copy of per-rank state such as RNG. A difference is an error that says to use
  :class:`ckptio.PerRank`.
* Loads check keys, shapes and dtypes up front and report every offending key at once.
* Quantized tensors are refused at save (their scale and zero point would be lost), and meta
  tensors at load (there is no memory to load into).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor

from ._buffers import tensor_memoryview
from .errors import CheckpointError, StateMismatchError
from .serialization import QUANTIZED_DTYPES, decode_value, encode_value, quantized_message


def _digest(obj: Any, where: str) -> str:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h = xxhash.xxh3_64(str((t.dtype, tuple(t.shape))).encode())
        if t.numel():
            h.update(tensor_memoryview(t))
        return h.hexdigest()
    return xxhash.xxh3_64(encode_value(obj, where)).hexdigest()


class SafeSavePlanner(DefaultSavePlanner):
    """:class:`DefaultSavePlanner` that writes JSON for objects and refuses silent per-rank dedup.

    ``enable_plan_caching`` turns on DCP's save-plan cache: when a rank's local plan is the same as
    in its previous save, it sends an empty plan and the coordinator reuses the cached global plan.
    The cached plan's storage data (file prefix and, on marker stores, the save's token) is
    replaced by the current save's (:meth:`finish_plan`), so a cached plan never names the previous
    save's files. It stays off by default: it saved 5-8% of small saves at 4-16 ranks on one
    machine (the planning collectives), and DCP keys its cache by planner class only, so a process
    that saves the same state with two different process groups would reuse a plan of the other
    group.
    """

    def __init__(self, check_replicas: bool = True, enable_plan_caching: bool = False) -> None:
        super().__init__(dedup_save_to_lowest_rank=True, enable_plan_caching=enable_plan_caching)
        self._check_replicas = check_replicas

    def create_local_plan(self) -> SavePlan:
        quantized = sorted(
            fqn
            for fqn, v in self.state_dict.items()
            if isinstance(v, torch.Tensor) and v.dtype in QUANTIZED_DTYPES
        )
        if quantized:
            raise StateMismatchError(quantized_message(quantized), mismatched=quantized)
        plan = super().create_local_plan()
        if not self._check_replicas or not torch.distributed.is_initialized():
            return plan
        digests: dict[str, str] = {}
        # ``self.plan``: the whole local plan, also when plan caching sends an empty one
        for item in self.plan.items:
            if item.type == WriteItemType.SHARD or isinstance(self.state_dict.get(item.index.fqn), DTensor):
                continue  # lookup_object returns a DTensor's local shard, which differs per rank by design
            obj = self.lookup_object(item.index)
            digests[item.index.fqn] = _digest(obj, item.index.fqn)
        return dataclasses.replace(plan, planner_data=(plan.planner_data, digests))

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if all_plans and isinstance(all_plans[0].planner_data, tuple):
            seen: dict[str, tuple[int, str]] = {}
            differing: list[str] = []
            for rank, plan in enumerate(all_plans):
                for fqn, d in plan.planner_data[1].items():
                    if fqn in seen and seen[fqn][1] != d:
                        differing.append(fqn)
                    seen.setdefault(fqn, (rank, d))
            if differing:
                keys = ", ".join(sorted(set(differing))[:10])
                raise CheckpointError(
                    f"plain values differ across ranks and would be silently deduplicated: {keys}. "
                    "Wrap per-rank state in ckptio.PerRank(...) (RNG: ckptio.RNGState()), or use DTensor."
                )
            all_plans = [dataclasses.replace(p, planner_data=p.planner_data[0]) for p in all_plans]
        return super().create_global_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        if not new_plan.usable and new_plan.storage_data is not None:
            # a cached plan: its items are this rank's, its storage data is the *previous* save's
            # (file prefix and, on marker stores, the save's token); this save's comes with new_plan
            plan = dataclasses.replace(plan, storage_data=new_plan.storage_data)
            self.plan = plan
        return plan

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(encode_value(object, write_item.index.fqn))
        return object


#: The single key under which :func:`ckptio.load` hands DCP its state (see :class:`SafeLoadPlanner`).
WRAPPED = "\x00ckptio-state"


class SafeLoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that reads JSON objects and validates the state up front.

    :param strict: missing keys (in the state but not the checkpoint) are an error; in non-strict
        mode they are left untouched and reported in :attr:`missing`. Keys present in the
        checkpoint but not in the state (:attr:`unexpected`) are an error only in strict mode.

    ``dcp.load`` checks every top-level value of the state against the runtime ``Stateful``
    protocol, twice; each check costs about 10 us (``typing`` walks the class's attributes), 4 ms
    for 200 tensors, which is 2% of a warm 2 GB load. ckptio has already turned ``Stateful``
    objects into their state dicts (:func:`ckptio.checkpoint.expand_state`), so it hands DCP
    ``{WRAPPED: state}`` and this planner plans for ``state`` itself: the names and the plan are
    the same as without the wrapper.
    """

    def __init__(self, strict: bool = True, per_rank_keys: Iterable[str] = (), rank: int = 0) -> None:
        super().__init__(allow_partial_load=True)
        self.strict = strict
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        # ``PerRank``/``RNGState`` entries of *other* ranks (``<key>.rank<N>...``) belong to those
        # ranks: every rank holds only its own, so they are neither unexpected nor an error here.
        self._per_rank_prefixes = [f"{k}.rank" for k in per_rank_keys]
        self._rank = rank

    def set_up_planner(
        self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        if isinstance(state_dict, dict) and len(state_dict) == 1 and WRAPPED in state_dict:
            state_dict = state_dict[WRAPPED]
        meta = _meta_tensors(state_dict)
        if meta:
            shown = ", ".join(meta[:10]) + (f", ... ({len(meta) - 10} more)" if len(meta) > 10 else "")
            raise StateMismatchError(
                f"cannot load into tensors on the meta device (they have no memory): {shown}. "
                "Materialise them first, e.g. model.to_empty(device='cpu') or torch.empty_like(t, device=...)",
                mismatched=meta,
            )
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def _other_rank(self, fqn: str) -> bool:
        for prefix in self._per_rank_prefixes:
            if fqn.startswith(prefix):
                num = fqn[len(prefix) :].split(".", 1)[0]
                return num.isdigit() and int(num) != self._rank
        return False

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        self.missing = sorted(k for k in self.state_dict if k not in stored)
        self.unexpected = sorted(k for k in stored if k not in self.state_dict and not self._other_rank(k))
        mismatched: list[str] = []
        details: list[str] = []
        for fqn, value in self.state_dict.items():
            md = stored.get(fqn)
            if md is None:
                continue
            if isinstance(value, torch.Tensor):
                if not isinstance(md, TensorStorageMetadata):
                    mismatched.append(fqn)
                    details.append(f"{fqn}: stored as a non-tensor value, state has a tensor")
                    continue
                if tuple(value.shape) != tuple(md.size) or value.dtype != md.properties.dtype:
                    mismatched.append(fqn)
                    details.append(
                        f"{fqn}: checkpoint {md.properties.dtype}{list(md.size)} vs state {value.dtype}{list(value.shape)}"
                    )
            elif isinstance(md, TensorStorageMetadata):
                # a tensor stored where the state holds a plain value: load it as a new tensor
                continue
            elif not isinstance(md, BytesStorageMetadata):  # pragma: no cover
                mismatched.append(fqn)
        if mismatched:
            raise StateMismatchError(
                "checkpoint does not match the state: " + "; ".join(details[:20]),
                mismatched=mismatched,
            )
        if self.strict and (self.missing or self.unexpected):
            parts = []
            if self.missing:
                parts.append(f"missing from checkpoint: {', '.join(self.missing[:20])}")
            if self.unexpected:
                parts.append(f"not in the state: {', '.join(self.unexpected[:20])}")
            raise StateMismatchError(
                "keys differ (pass strict=False to allow): " + "; ".join(parts),
                missing=self.missing,
                unexpected=self.unexpected,
            )
        # tensors stored where the state has None/plain values get fresh destinations
        for fqn, value in list(self.state_dict.items()):
            md = stored.get(fqn)
            if isinstance(md, TensorStorageMetadata) and not isinstance(value, torch.Tensor):
                fresh = torch.empty(md.size, dtype=md.properties.dtype)
                self.state_dict[fqn] = fresh
                set_element(self.original_state_dict, self.mappings[fqn], fresh)
        if self.missing:  # DCP's plan also tells pre-2.4 checkpoints' key names apart
            return super().create_local_plan()
        return LoadPlan(_whole_reads(self.state_dict, stored))

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.state_dict.get(read_item.dest_index.fqn)
        if isinstance(t, torch.Tensor) and type(t) in _PLAIN and t.shape == read_item.lengths:
            return t  # read whole: DCP's lookup returns t itself
        return super().resolve_tensor(read_item)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_value(value.getvalue(), fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _whole_reads(state: dict[str, Any], stored: dict[str, Any]) -> list[ReadItem]:
    """The plan DCP makes for ``state`` (every key stored, shapes checked), about 5x faster in the
    common case: a plain tensor stored as one whole chunk is read whole, here. Everything else (a
    DTensor, a tensor stored in chunks, an empty tensor, a value) is planned by DCP itself."""
    items: list[ReadItem] = []
    fallback: dict[str, Any] = {}
    load = LoadItemType.TENSOR
    for fqn, value in state.items():
        md = stored[fqn]
        if (
            not isinstance(md, TensorStorageMetadata)
            or type(value) not in _PLAIN
            or len(md.chunks) != 1
            or any(md.chunks[0].offsets)
            or md.chunks[0].sizes != md.size
            or 0 in md.size  # DCP reads nothing for an empty tensor
        ):
            fallback[fqn] = value
            continue
        zero = md.chunks[0].offsets  # a torch.Size of zeros, as DCP's own plan has
        index = MetadataIndex(fqn, zero, 0)
        items.append(
            ReadItem(
                type=load,
                dest_index=index,
                dest_offsets=zero,
                storage_index=index,
                storage_offsets=zero,
                lengths=md.size,
            )
        )
    if fallback:
        meta = Metadata(state_dict_metadata=stored)
        items.extend(create_default_local_load_plan(fallback, meta, True).items)
    return items


def _meta_tensors(state: Any) -> list[str]:
    """Dotted keys of the tensors on the meta device in a nested state (iterative walk)."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", state)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.device.type == "meta":
                found.append(prefix)
        elif isinstance(value, Mapping):
            stack.extend((f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{prefix}.{i}" if prefix else str(i), v) for i, v in enumerate(value))
    return sorted(found)
