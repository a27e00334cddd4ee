"""Worker for the crash tests: a zygote that forks checkpointing workers to be SIGKILLed.

Importing torch costs seconds on a loaded machine, so the zygote imports once and forks a fresh
worker per kill (no torch op runs in the zygote before forking, so no thread pool is inherited).
Protocol on stdin/stdout, one line each:

* ``run {"url": ..., "mode": "sync"|"async", "seed": n, "progress": path, "storage_options": {...}}``
  -> ``pid <n>``; the worker resumes from the newest committed step, checks it holds what that
  step saved, then saves steps forever, appending ``saved <step>`` (sync: committed; async: staged)
  or ``BAD <why>`` to the progress file, and ``started <step>`` once resumed.
* ``run {"kind": "overwrite"|"consolidate"|"cp"|"latest", "url": ..., "start": k, ...}``: the other
  loops, each publishing version ``k``, ``k + 1``... at one URL forever (``saved <k>`` after each):
  ``ckptio.save(..., overwrite=True)`` over a plain URL; ``consolidate(sources[k % n], url,
  overwrite=True)`` into an existing HF directory; ``ckptio cp sources[k % n] url --overwrite``;
  tiny ``CheckpointManager`` saves whose ``latest`` rewrite is a large part of the time.
* ``reap`` -> ``exit <status>`` once the worker is gone.  ``quit`` ends the zygote.

The zygote's loop (:func:`serve`), the progress notes (:func:`progress_note`) and the preloading of
plugins (:func:`preload_plugins`) are shared with ``tests/dcp/dcp_crash_child.py``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
import warnings
from collections.abc import Callable
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


def progress_note(path: str) -> Callable[[str], None]:
    """A function appending one line to the progress file ``path`` (a single ``O_APPEND`` write,
    so a kill never leaves half a line)."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(log, (line + "\n").encode())

    return note


def work(cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg["seed"])
    note = progress_note(cfg["progress"])
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


def small_state(k: int) -> dict[str, Any]:
    """A tiny state whose every value says ``k``: saving it is quick, so kills often land in the
    commit (the renames, the ``latest`` rewrite) rather than in the data."""
    return {"w": torch.full((16,), float(k)), "step": k}


def work_overwrite(cfg: dict[str, Any], note: Any) -> None:
    note(f"started {cfg['start']}")
    k = cfg["start"]
    while True:
        ckptio.save(make_state(k), cfg["url"], overwrite=True)
        note(f"saved {k}")
        k += 1


def work_consolidate(cfg: dict[str, Any], note: Any) -> None:
    from ckptio_safetensors import consolidate

    sources, shard_sizes = cfg["sources"], cfg["shard_sizes"]
    note(f"started {cfg['start']}")
    k = cfg["start"]
    while True:
        i = k % len(sources)
        consolidate(
            sources[i], cfg["url"], overwrite=True, max_shard_size=shard_sizes[i], progress=False, workers=1
        )
        note(f"saved {k}")
        k += 1


def work_cp(cfg: dict[str, Any], note: Any) -> None:
    from ckptio import cli

    sources = cfg["sources"]
    sys.stdout = open(os.devnull, "w")  # stdout is the zygote's reply pipe
    note(f"started {cfg['start']}")
    k = cfg["start"]
    while True:
        code = cli.main(["cp", sources[k % len(sources)], cfg["url"], "--overwrite", "--no-progress"])
        if code != 0:
            note(f"BAD cp exited {code}")
            os._exit(3)
        note(f"saved {k}")
        k += 1


def work_latest(cfg: dict[str, Any], note: Any) -> None:
    mgr = ckptio.CheckpointManager(cfg["url"], retention=ckptio.KeepLatest(2))
    latest = mgr.latest_step()
    k = 0 if latest is None else latest + 1
    note(f"started {latest}")
    while True:
        mgr.save(k, small_state(k))
        note(f"saved {k}")
        k += 1


KINDS = {"overwrite": work_overwrite, "consolidate": work_consolidate, "cp": work_cp, "latest": work_latest}


def run(cfg: dict[str, Any]) -> None:
    """The body of one forked worker: the series or one of :data:`KINDS`."""
    if cfg.get("kind", "series") == "series":
        work(cfg)
    else:
        KINDS[cfg["kind"]](cfg, progress_note(cfg["progress"]))


def serve(body: Callable[[dict[str, Any]], None]) -> None:
    """The zygote: say ``ready``, then answer ``run <json>`` by forking a worker that runs
    ``body(cfg)`` until it is killed (exit status 2 and a traceback on stderr if it raises),
    ``reap`` with the worker's wait status, and ``quit`` by returning."""
    print("ready", flush=True)
    child = 0
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            cfg = json.loads(arg)
            child = os.fork()
            if child == 0:
                code = 0
                try:
                    body(cfg)
                except BaseException:
                    traceback.print_exc()
                    code = 2
                finally:
                    os._exit(code)
            print(f"pid {child}", flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(child, 0)
            print(f"exit {status}", flush=True)
        elif cmd == "quit":
            return


def preload_plugins() -> None:
    """Import the native format and the ``file``/``s3`` backends now, so that each forked worker
    starts fast."""
    from ckptio.plugins import backend_factory, get_format

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_format("native")
        for scheme in ("file", "s3"):
            try:
                backend_factory(scheme)
            except ckptio.PluginError:
                pass


def preload() -> None:
    """Import plugins and DCP's lazy modules now, so that each forked worker starts fast."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckptio.list_plugins()
        importlib.import_module("ckptio.cli")  # the cp loop

        try:
            import ckptio_safetensors.consolidation  # noqa: F401  (the consolidate loop)
        except ImportError:
            pass
    preload_plugins()


if __name__ == "__main__":
    preload()
    serve(run)
