"""Spawn N gloo ranks on CPU for the safetensors tests (a top-level function per rank body)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _main(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)  # our own test results, not checkpoint data


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, run in spawned processes; a failing rank raises."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _main, args=(fn, args, world, free_port(), out), nprocs=world, join=True, start_method="spawn"
        )
        results = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
