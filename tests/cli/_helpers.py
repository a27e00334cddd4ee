"""Helpers and fixtures for the ``ckptio`` command-line tests: real checkpoints on disk, built in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio import cli

CKPTIO_BIN = Path(sys.executable).parent / "ckptio"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def make_state(model: torch.nn.Module, step: int = 5) -> dict[str, Any]:
    """Tensors (model + AdamW state) and plain values, nested, as a training loop would save."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, opt),
        "step": step,
        "config": {"lr": 1e-3, "name": "tiny", "betas": (0.9, 0.95)},
    }


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """A CheckpointManager root with committed steps 10, 20, 30 (30 is latest)."""
    root = tmp_path / "run"
    model = tiny_model()
    state = make_state(model)
    with ckptio.CheckpointManager(str(root)) as mgr:
        for step in (10, 20, 30):
            state["step"] = step
            mgr.save(step, state, metrics={"loss": 1.0 / step})
    return root


@pytest.fixture
def single(tmp_path: Path) -> Path:
    """One committed checkpoint (not a series) with user metadata."""
    path = tmp_path / "single"
    ckptio.save(make_state(tiny_model(1), step=7), str(path), metadata={"run": "cli-test"})
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ckptio.cli.main(args)`` in this process; returns (exit status, stdout, stderr)."""
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code, out, _ = run_main([*args, "--json"], capsys)
    return code, json.loads(out)


def run_bin(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The installed ``ckptio`` console script, as a user runs it."""
    full_env = {**os.environ, "CKPTIO_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [str(CKPTIO_BIN), *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )
