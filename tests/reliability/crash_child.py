"""Worker for the crash tests: a zygote that forks checkpointing workers to be SIGKILLed.

Importing torch costs seconds on a loaded machine, so the zygote imports once and forks a fresh
worker per kill (no torch op runs in the zygote before forking, so no thread pool is inherited).
Protocol on stdin/stdout, one line each:

* ``run {"url": ..., "mode": "sync"|"async", "seed": n, "progress": path, "storage_options": {...}}``
  -> ``pid <n>``; the worker resumes from the newest committed step, checks it holds what that
  step saved, then saves steps forever, appending ``saved <step>`` (sync: committed; async: staged)
  or ``BAD <why>`` to the progress file, and ``started <step>`` once resumed.
* ``reap`` -> ``exit <status>`` once the worker is gone.  ``quit`` ends the zygote.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from typing import Any

import ckptio
import torch


def make_state(step: int) -> dict[str, Any]:
    """Every tensor filled with the step number, so a load proves which step it came from."""
    return {
        "model": {
            "w0": torch.full((64, 64), float(step)),
            "w1": torch.full((1000,), step % 128, dtype=torch.bfloat16),
            "blocks": [torch.full((7, 3), step, dtype=torch.int64), torch.full((5,), float(step))],
        },
        "step": step,
        "meta": {"name": "crash-test", "lr": step * 0.5, "tags": ["a", step]},
    }


def fresh_state() -> dict[str, Any]:
    s = make_state(0)
    s["model"]["w0"].fill_(-1)
    s["step"] = -1
    return s


def check_state(state: dict[str, Any], step: int) -> str | None:
    """``None`` when ``state`` is exactly what :func:`make_state` gives for ``step``."""
    want = make_state(step)
    if state["step"] != step or state["meta"] != want["meta"]:
        return f"plain values {state['step']!r} {state['meta']!r} are not step {step}'s"
    pairs = [
        (state["model"]["w0"], want["model"]["w0"]),
        (state["model"]["w1"], want["model"]["w1"]),
        *zip(state["model"]["blocks"], want["model"]["blocks"]),
    ]
    for got, exp in pairs:
        if got.dtype != exp.dtype or got.shape != exp.shape or not torch.equal(got, exp):
            return f"a tensor does not hold step {step}'s values"
    return None


def work(cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg["seed"])
    log = os.open(cfg["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(log, (line + "\n").encode())

    mgr = ckptio.CheckpointManager(
        cfg["url"],
        retention=ckptio.KeepLatest(2),
        async_save=cfg["mode"] == "async",
        storage_options=cfg.get("storage_options"),
    )
    latest = mgr.latest_step()
    if latest is not None:
        state = fresh_state()
        mgr.load(state)
        bad = check_state(state, latest)
        if bad:
            note(f"BAD resume from {latest}: {bad}")
            os._exit(3)
        if cfg["mode"] == "sync" and rng.random() < 0.3:  # overwrite a committed step now and then
            mgr.save(latest, make_state(latest))
            note(f"saved {latest}")
    note(f"started {latest}")
    step = 0 if latest is None else latest + 1
    while True:
        mgr.save(step, make_state(step), metrics={"loss": 1.0 / (step + 1)})
        note(f"saved {step}")
        step += 1


def main() -> None:
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            cfg = json.loads(arg)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    work(cfg)
                except BaseException:
                    traceback.print_exc()
                    code = 2
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
            child = pid
        elif cmd == "reap":
            _, status = os.waitpid(child, 0)
            print(f"exit {status}", flush=True)
        elif cmd == "quit":
            return


def preload() -> None:
    """Import plugins and DCP's lazy modules now, so that each forked worker starts fast."""
    import warnings

    from ckptio.plugins import backend_factory, get_format

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptio.list_plugins()
        get_format("native")
        for scheme in ("file", "s3"):
            try:
                backend_factory(scheme)
            except ckptio.PluginError:
                pass


if __name__ == "__main__":
    preload()
    print("ready", flush=True)
    main()
