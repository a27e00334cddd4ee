"""Deterministic states for the tiered tests: a row-sharded DTensor across the ranks (one shard
per rank, so each rank's bytes live in its own files), a per-rank tensor, and replicated values."""

from __future__ import annotations

from typing import Any

import ckptio
import torch

ROWS_PER_RANK, COLS = 4, 8


def values(step: int, rank: int) -> torch.Tensor:
    """This rank's shard of the sharded tensor at ``step``."""
    base = torch.arange(ROWS_PER_RANK * COLS, dtype=torch.float32).reshape(ROWS_PER_RANK, COLS)
    return base + 1000.0 * step + 100.0 * rank


def make_state(step: int, rank: int, world: int, *, empty: bool = False) -> dict[str, Any]:
    """The state a rank saves at ``step`` (``empty``: zeros of the same layout, to load into)."""
    shard = torch.zeros(ROWS_PER_RANK, COLS) if empty else values(step, rank)
    mine = torch.zeros(3) if empty else torch.full((3,), float(step * 10 + rank))
    state: dict[str, Any] = {
        "mine": ckptio.PerRank(mine),
        "shared": torch.zeros(5) if empty else torch.full((5,), float(step)),
        "step": -1 if empty else step,
    }
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (world,))
        state["w"] = DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)
    else:
        state["w"] = shard
    return state


def check_state(state: dict[str, Any], step: int, rank: int) -> str | None:
    """``None`` when ``state`` holds what ``make_state(step, rank, ...)`` saved, else what differs."""
    w = state["w"]
    local = w.to_local() if hasattr(w, "to_local") else w
    if not torch.equal(local, values(step, rank)):
        return f"w differs on rank {rank}"
    if not torch.equal(state["mine"].value, torch.full((3,), float(step * 10 + rank))):
        return f"mine differs on rank {rank}"
    if not torch.equal(state["shared"], torch.full((5,), float(step))):
        return "shared differs"
    if state["step"] != step:
        return f"step is {state['step']}, not {step}"
    return None
