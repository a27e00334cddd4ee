"""Child process for the ``rm`` tests: one ``CheckpointManager.save`` that pauses between writing
its data and committing, until the parent says go.

``python _live_save.py ROOT STEP READY GO``: writes READY once the step's data is in its staging
directory, waits for GO to exist (60 s at most), then commits and prints ``saved`` (or
``error <type>: <message>``). The run lock is held from the start of the save to the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ckptio
import torch


class Pause:
    name = "pause"

    def __init__(self, ready: Path, go: Path) -> None:
        self.ready, self.go = ready, go

    def on_tensors_written(self, ctx: Any) -> None:
        self.ready.write_text("ready")
        deadline = time.monotonic() + 60
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def main() -> None:
    root, step, ready, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    with ckptio.CheckpointManager(root, addons=[Pause(ready, go)]) as mgr:
        try:
            mgr.save(step, {"w": torch.full((1000,), float(step))})
            print("saved", flush=True)
        except ckptio.CheckpointError as exc:
            print(f"error {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
