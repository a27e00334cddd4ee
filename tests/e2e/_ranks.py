"""Run a function on N real ranks: spawned processes joined by a gloo process group on CPU.

Reusable by every multi-rank test::

    from tests.e2e._ranks import run_ranks

    def body(rank: int, world_size: int, path: str) -> int:   # top level, so spawn can pickle it
        ...
        return something_picklable

    results = run_ranks(body, 2, args=(str(tmp_path),))       # [result of rank 0, result of rank 1]

Each rank gets ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, joins
``init_process_group("gloo")``, always leaves with ``destroy_process_group()``, then exits
without finalising the interpreter (:func:`exit_without_finalizing`: a race in torch). A rank that
raises makes :func:`run_ranks` raise (with the rank's traceback); ranks still alive past
``timeout`` are killed by their process id and :class:`RankTimeout` is raised, so a hung
collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch.distributed as dist
import torch.multiprocessing as mp


class RankTimeout(AssertionError):
    """The ranks did not finish within the timeout (they were killed)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_without_finalizing() -> NoReturn:
    """End a rank process whose work is done (its result written) without finalising the
    interpreter.

    A gloo worker thread that finished the last collective a moment ago may still be destroying
    its work, whose tensors have Python references: that needs the GIL, and a thread taking the
    GIL while the interpreter finalises is unwound through C++ code that cannot be unwound, so
    the rank aborts ("terminate called without an active exception", SIGABRT; the core shows
    ``ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork -> decref_pyobject -> take_gil ->
    pthread_exit``). A race in torch, not in the code under test (pytorch/pytorch#179291); it
    failed about one run in ten of a two-rank test here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    world_size: int,
    port: int,
    result_dir: str,
    env: dict[str, str],
    timeout: float,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # a crash (SIGABRT, SIGSEGV) prints every Python thread's stack, and a hung collective
    # prints them before the parent kills the rank
    faulthandler.enable(all_threads=True)
    faulthandler.dump_traceback_later(max(1.0, timeout - 10), exit=False)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)  # test harness only: results of our own code, never checkpoint data
    exit_without_finalizing()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple[Any, ...] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results.

    ``fn`` and ``args`` must be picklable (a top-level function of an importable module).
    ``env`` is added to each rank's environment (e.g. ``{"CKPTIO_PLUGINS": "local"}``).
    """
    with tempfile.TemporaryDirectory(prefix="ckptio-ranks-") as result_dir:
        ctx = mp.start_processes(
            _rank_main,
            args=(fn, args, world_size, free_port(), result_dir, dict(env or {}), timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise RankTimeout(
                        f"{world_size} ranks running {fn.__name__} did not finish in {timeout:.0f}s"
                    )
        finally:
            for p in ctx.processes:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.join(5)
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
