"""The few collectives the orchestration needs, no-ops without a process group."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from .errors import CheckpointError

T = TypeVar("T")


def active(pg: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_size(pg: Any = None) -> tuple[int, int]:
    if not active(pg):
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def _src(pg: Any) -> int:
    return dist.get_global_rank(pg, 0) if pg is not None else 0


def broadcast(obj: Any, pg: Any = None) -> Any:
    """``obj`` from the coordinator (group rank 0) on every rank."""
    if not active(pg):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_src(pg), group=pg)
    return box[0]


def on_coordinator(fn: Callable[[], T], pg: Any = None, share_result: bool = False) -> T | None:
    """Run ``fn`` on the coordinator; if it raises, raise the same error on every rank.

    This is how a failed commit (or clean-up) on rank 0 stops all ranks instead of hanging them.
    """
    rank, _ = rank_and_size(pg)
    result: Any = None
    error: BaseException | None = None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # shipped to the other ranks below
            error = exc
    if active(pg):
        payload = broadcast((error, result if share_result else None), pg)
        error, shared = payload
        if rank != 0:
            result = shared
    if error is not None:
        raise error
    return result


def all_gather(obj: Any, pg: Any = None) -> list[Any]:
    if not active(pg):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out


def any_failed(failed: bool, pg: Any = None) -> bool:
    """True on every rank when any rank failed (so all ranks take the same branch)."""
    if not active(pg):
        return failed
    return any(all_gather(failed, pg))


def portable(exc: BaseException) -> BaseException:
    """``exc`` when it survives pickling (to travel to the other ranks), else a CheckpointError."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return CheckpointError(f"{type(exc).__name__}: {exc}")
