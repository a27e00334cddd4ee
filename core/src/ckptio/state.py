"""Stateful wrappers: what users put in the state they save.

``ModelState`` and ``OptimizerState`` go through ``torch.distributed.checkpoint.state_dict``, which
understands plain modules, DTensor and FSDP2 ``fully_shard`` alike, and returns tensors that share
storage with the parameters, so a load writes into the model in place and tied weights stay tied.
``PerRank`` marks state that differs between ranks (RNG, data-loader position) so that it is
stored once per rank instead of being deduplicated.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .errors import StateMismatchError


class ModelState(Stateful):
    """A model's parameters and persistent buffers, keyed by their fully-qualified names.

    :param model: an ``nn.Module`` (plain, DTensor-parallel or FSDP2-sharded), or a list of them:
        the parts of a pipeline-parallel model (torchtitan's ``model_parts``), each holding its own
        subset of the FQNs. Their state dicts are merged into one (an FQN found in two parts is
        refused) and a load hands each part back its own keys, so the checkpoint does not depend
        on how the model was split.
    :param options: ``StateDictOptions`` passed to torch's state-dict helpers (e.g.
        ``ignore_frozen_params=True`` to save only trainable weights).
    :param adapters_only: hold only what fine-tuning changes: the trainable parameters (for a
        PEFT model, the adapter weights and the ``modules_to_save`` copies) and the persistent
        buffers, not the frozen base weights, as NeMo AutoModel's ``is_peft`` does. Resume
        checkpoints shrink to the adapter's size; loading one (``strict=True`` included) into the
        same model fills the trainable weights and leaves the frozen ones as they are.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        options: StateDictOptions | None = None,
        *,
        adapters_only: bool = False,
    ) -> None:
        self.model = model
        self.parts = _parts(model, "ModelState")
        self.options = options
        self.adapters_only = adapters_only
        self._owners: list[set[str]] | None = None

    def _options(self, op: str) -> StateDictOptions | None:
        if not self.adapters_only:
            return self.options
        base = dataclasses.replace(self.options or StateDictOptions(), ignore_frozen_params=True)
        # the frozen weights are neither returned nor given back: torch's strict load would call
        # them missing, so ``load_state_dict`` loads leniently and checks the keys itself
        return base if op == "get" else dataclasses.replace(base, strict=False)

    def state_dict(self) -> dict[str, Any]:
        dicts = [get_model_state_dict(part, options=self._options("get")) for part in self.parts]
        if self.adapters_only:  # torch keeps a frozen weight's tied aliases (a tied lm_head): drop them
            for part, d in zip(self.parts, dicts):
                for key in _frozen_fqns(part) & d.keys():
                    del d[key]
        self._owners = [set(d) for d in dicts]
        return _merge(dicts, "ModelState")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, sd in zip(self.parts, self._split(state_dict)):
            result = set_model_state_dict(part, sd, options=self._options("set"))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if self.adapters_only and unexpected:
                raise StateMismatchError(
                    f"ModelState(adapters_only=True): the model has no place for {sorted(unexpected)[:8]}"
                )

    def _split(self, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
        if len(self.parts) == 1:
            return [state_dict]
        if self._owners is None or not set(state_dict) <= set().union(*self._owners):
            self.state_dict()  # learn which part owns which key (the state dicts share storage)
        assert self._owners is not None
        out = [{k: v for k, v in state_dict.items() if k in keys} for keys in self._owners]
        placed = set().union(*self._owners)
        stray = sorted(k for k in state_dict if k not in placed)
        if stray:
            raise StateMismatchError(f"ModelState: no model part has {stray[:8]}")
        return out


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter FQNs (so it reshards), plus an optional scheduler.

    A freshly built optimizer has no state yet; torch's helper initialises it (with zero-gradient
    bookkeeping, parameters unchanged) so that a load has destinations to fill.

    Pipeline parallelism: pass the model parts and their optimizers as two lists of the same
    length (``OptimizerState([part0, part1], [opt0, opt1])``). The state is then stored
    flattened, as torchtitan stores it (``state.<fqn>.<name>`` and ``param_groups.<fqn>.<name>``,
    torch's ``flatten_optimizer_state_dict=True``), so every value is keyed by a parameter's FQN
    and the checkpoint loads into any split of the model: another number of stages, or a single
    model given ``options=StateDictOptions(flatten_optimizer_state_dict=True)``. A list of
    schedulers (one per part, stepped together) is stored once when their states are the same
    (torchtitan's case, so any split loads it), else as a list, one state per part (the split
    must then be the same on load).
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any | None = None,
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.parts = _parts(model, "OptimizerState")
        self.optimizers = _optimizers(optimizer, len(self.parts))
        self.pipelined = not isinstance(model, torch.nn.Module)
        if self.pipelined:
            options = dataclasses.replace(options or StateDictOptions(), flatten_optimizer_state_dict=True)
        self.options = options
        self._owners: list[set[str]] | None = None

    def _schedulers(self) -> list[Any]:
        if self.scheduler is None:
            return []
        if isinstance(self.scheduler, (list, tuple)):
            return list(self.scheduler)
        return [self.scheduler]

    def state_dict(self) -> dict[str, Any]:
        dicts = [
            get_optimizer_state_dict(part, opt, options=self.options)
            for part, opt in zip(self.parts, self.optimizers)
        ]
        self._owners = [set(d) for d in dicts]
        sd: dict[str, Any] = {"optim": _merge(dicts, "OptimizerState") if self.pipelined else dicts[0]}
        schedulers = [s.state_dict() for s in self._schedulers()]
        if schedulers:
            same = all(_equal(s, schedulers[0]) for s in schedulers[1:])
            sd["scheduler"] = (
                schedulers[0] if same or not isinstance(self.scheduler, (list, tuple)) else schedulers
            )
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        optim = state_dict["optim"]
        if not self.pipelined:
            set_optimizer_state_dict(self.parts[0], self.optimizers[0], optim, options=self.options)
        else:
            if self._owners is None or not set(optim) <= set().union(*self._owners):
                self.state_dict()
            assert self._owners is not None
            for part, opt, keys in zip(self.parts, self.optimizers, self._owners):
                sd = {k: v for k, v in optim.items() if k in keys}
                set_optimizer_state_dict(part, opt, sd, options=self.options)
        stored = state_dict.get("scheduler")
        schedulers = self._schedulers()
        if isinstance(stored, list):
            if len(stored) != len(schedulers):
                raise StateMismatchError(
                    f"OptimizerState: {len(stored)} scheduler states stored (one per part), {len(schedulers)} given"
                )
            for sched, value in zip(schedulers, stored):
                sched.load_state_dict(value)
        elif stored is not None:
            for sched in schedulers:
                sched.load_state_dict(stored)


def _parts(model: Any, who: str) -> list[torch.nn.Module]:
    """The model parts of ``model``: ``[model]`` for a module, the list's items for a list."""
    if isinstance(model, torch.nn.Module):
        return [model]
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, torch.nn.Module) for m in model):
        return list(model)
    raise TypeError(
        f"{who}: expected an nn.Module or a non-empty list of nn.Module parts, got {type(model).__name__}"
    )


def _optimizers(optimizer: Any, n: int) -> list[torch.optim.Optimizer]:
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if len(opts) != n:
        raise TypeError(f"OptimizerState: {n} model part(s) but {len(opts)} optimizer(s); pass one per part")
    return opts


#: Wrappers' attributes that torch's state-dict FQNs leave out (activation checkpointing,
#: ``torch.compile``, FSDP1).
_WRAPPER_ATOMS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def _frozen_fqns(model: torch.nn.Module) -> set[str]:
    """The state-dict names of every frozen parameter, tied aliases included."""
    from torch.nn.parallel import DistributedDataParallel

    out: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            continue
        atoms = [a for a in name.split(".") if a not in _WRAPPER_ATOMS]
        if isinstance(model, DistributedDataParallel) and atoms[:1] == ["module"]:
            atoms = atoms[1:]
        out.add(".".join(atoms))
    return out


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):  # tensors inside: compared as different
        return False


def _merge(dicts: list[dict[str, Any]], who: str) -> dict[str, Any]:
    """The union of the parts' state dicts; a key in two parts is refused (it would be ambiguous)."""
    if len(dicts) == 1:
        return dicts[0]
    merged: dict[str, Any] = {}
    owner: dict[str, int] = {}
    for i, d in enumerate(dicts):
        for k, v in d.items():
            if k in owner:
                raise StateMismatchError(
                    f"{who}: {k!r} is in model parts {owner[k]} and {i}; each part must hold its own FQNs"
                )
            owner[k] = i
            merged[k] = v
    return merged


class PerRank:
    """Marks a value that differs on every rank; stored under ``rank<N>`` for each rank.

    Loading with a different world size finds no entry for new ranks; they keep their value
    (reported as missing in non-strict loads).
    """

    def __init__(self, value: Any) -> None:
        self.value = value


class RNGState(Stateful):
    """The random generators of this process: torch CPU (and CUDA when present) and ``random``.

    Always stored per rank (each rank draws its own stream); resume is bit-exact when the world
    size is unchanged.
    """

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            sd["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        py = state_dict["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state_dict["cuda"]))


def is_per_rank(value: Any) -> bool:
    return isinstance(value, (PerRank, RNGState))
