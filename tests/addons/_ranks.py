"""Run a function on N real gloo ranks (spawned processes) and collect what each returns."""

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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int, fn: Callable[..., Any], args: tuple[Any, ...], world: int, port: int, out: str
) -> None:
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
        pickle.dump(result, f)  # test results between our own processes


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_main, args=(fn, args, world, _port(), out), nprocs=world, join=True, start_method="spawn"
        )
        results = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
