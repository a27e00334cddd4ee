"""Worker for ``test_dcp_io``'s SIGKILL test: a zygote that forks plain ``dcp.save`` loops.

The zygote imports torch, DCP and ckptio once and forks a worker per kill (no torch op runs in it
before forking). Protocol, one line each way:

* ``run {"root": ..., "start": k, "overwrite": bool, "progress": path, "storage_options": ...}``
  -> ``pid <n>``. The worker saves steps ``k``, ``k + 1``... forever with
  ``dcp.save(state, storage_writer=ckptio.storage_writer(<root>/step_<k>))``, appending
  ``saved <k>`` to the progress file after each save returned; with ``overwrite`` it saves each
  step twice, the second time over its committed copy.
* ``reap`` -> ``exit <status>`` once the worker is gone; ``quit`` ends the zygote.

The zygote's loop is ``tests/reliability/crash_child.py``'s :func:`serve`.
"""

from __future__ import annotations

import warnings
from typing import Any

import ckptio
import torch
import torch.distributed.checkpoint as dcp

from tests.reliability.crash_child import preload_plugins, progress_note, serve


def make_state(step: int) -> dict[str, Any]:
    """Every value says ``step``, so a load proves which save it came from."""
    return {
        "model": {
            "w": torch.full((256, 256), float(step)),
            "b": torch.full((4096,), step, dtype=torch.int64),
            "h": torch.full((999,), step % 64, dtype=torch.bfloat16),
        },
        "step": step,
        "meta": {"tag": "dcp", "steps": [step, step + 1]},
    }


def fresh_state() -> dict[str, Any]:
    state = make_state(0)
    for t in state["model"].values():
        t.fill_(-1)
    state["step"], state["meta"] = -1, {"tag": "", "steps": []}
    return state


def check_state(state: dict[str, Any], step: int) -> str | None:
    want = make_state(step)
    if state["step"] != step or state["meta"] != want["meta"]:
        return f"values {state['step']!r} {state['meta']!r} are not step {step}'s"
    for name, t in want["model"].items():
        got = state["model"][name]
        if got.dtype != t.dtype or not torch.equal(got, t):
            return f"tensor {name} does not hold step {step}'s values"
    return None


def step_url(root: str, step: int) -> str:
    return f"{root}/step_{step:08d}"


def work(cfg: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    note = progress_note(cfg["progress"])

    def save(step: int) -> None:
        writer = ckptio.storage_writer(step_url(cfg["root"], step), storage_options=cfg["storage_options"])
        dcp.save(make_state(step), storage_writer=writer)
        note(f"saved {step}")

    step = cfg["start"]
    while True:
        save(step)
        if cfg["overwrite"]:
            save(step)
        step += 1


if __name__ == "__main__":
    preload_plugins()
    serve(work)
