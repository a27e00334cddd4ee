"""``run-info``: writes ``run_info.json`` into every checkpoint and checks it before loading.

A complete addon in a few lines: plain methods named after the hooks of
:class:`ckptio.AddonSpec`, each receiving one :class:`ckptio.AddonContext`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from ckptio import AddonContext, CheckpointError

RUN_INFO = "run_info.json"


class RunInfoAddon:
    """Records ``run_name`` and the save's step and world size; refuses loads from another run.

    :param run_name: this run's name, stored on save and, when ``check_run`` is set, required on load.
    :param check_run: refuse to load a checkpoint whose ``run_info.json`` names another run.
    """

    name = "run-info"

    def __init__(self, run_name: str = "default", check_run: bool = True) -> None:
        self.run_name = run_name
        self.check_run = check_run
        self.loaded: dict[str, Any] | None = None  # what the last load found, for the caller

    def on_save_start(self, ctx: AddonContext) -> None:
        if ctx.is_coordinator:  # one writer per checkpoint
            info = {
                "run_name": self.run_name,
                "step": ctx.step,
                "world_size": ctx.world_size,
                "torch": torch.__version__,
            }
            ctx.write_bytes(RUN_INFO, json.dumps(info, indent=2, sort_keys=True).encode())

    def validate_load(self, ctx: AddonContext) -> None:
        if not ctx.exists(RUN_INFO):
            raise CheckpointError(f"{ctx.url} has no {RUN_INFO}: it was not saved with the run-info addon")
        info = json.loads(ctx.read_bytes(RUN_INFO))
        if self.check_run and info.get("run_name") != self.run_name:
            raise CheckpointError(
                f"{ctx.url} belongs to run {info.get('run_name')!r}, not {self.run_name!r}; "
                "pass ('run-info', {'check_run': False}) to load it anyway"
            )
        self.loaded = info
