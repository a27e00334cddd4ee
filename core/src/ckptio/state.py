"""Stateful wrappers: what users put in the state they save.

``ModelState`` and ``OptimizerState`` go through ``torch.distributed.checkpoint.state_dict``, which
understands plain modules, DTensor and FSDP2 ``fully_shard`` alike, and returns tensors that share
storage with the parameters, so a load writes into the model in place and tied weights stay tied.
``PerRank`` marks state that differs between ranks (RNG, data-loader position) so that it is
stored once per rank instead of being deduplicated.
"""

from __future__ import annotations

import random
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


class ModelState(Stateful):
    """A model's parameters and persistent buffers, keyed by their fully-qualified names.

    :param model: an ``nn.Module`` (plain, DTensor-parallel or FSDP2-sharded).
    :param options: ``StateDictOptions`` passed to torch's state-dict helpers (e.g.
        ``ignore_frozen_params=True`` to save only trainable weights).
    """

    def __init__(self, model: torch.nn.Module, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter FQNs (so it reshards), plus an optional scheduler.

    A freshly built optimizer has no state yet; torch's helper initialises it (with zero-gradient
    bookkeeping, parameters unchanged) so that a load has destinations to fill.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        }
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict["optim"], options=self.options)
        if self.scheduler is not None and "scheduler" in state_dict:
            self.scheduler.load_state_dict(state_dict["scheduler"])


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
