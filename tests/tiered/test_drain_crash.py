"""SIGKILL in the middle of a drain to S3: the durable tier never shows a partial step, and the
next run copies the step again (its leftovers are cleaned up) before going on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ckptio
import pytest

REPO = Path(__file__).resolve().parents[2]


def _child(mode: str, root: str, local: Path, report: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.tiered.drain_child", mode, root, str(local), str(report)],
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_sigkill_during_a_drain(tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    root, local = f"s3://{s3_bucket}/run", tmp_path / "nvme"
    report, log = tmp_path / "report", tmp_path / "child.log"
    proc = _child("kill", root, local, report, log)
    try:
        deadline = time.monotonic() + 180
        while not report.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the drain never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    # some data reached S3, the manifest did not: the step does not exist there
    with ckptio.CheckpointManager(root) as plain:
        assert plain.steps() == [] and plain.latest_step() is None
        assert plain.all_steps() == {1: False}
        leftovers = plain.backend.listdir(plain.root.path)
        assert any(name.endswith(".ckptio-lease") for name in leftovers), leftovers
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load(make_empty(), f"{root}/step_00000001")
    # the next run restores step 1 from the local tier and copies it again
    report.unlink()
    proc = _child("resume", root, local, report, log)
    assert proc.wait(240) == 0, log.read_text()
    out = json.loads(report.read_text())
    assert out["before"] == {"1": ["local"]}
    assert (out["step"], out["source"], out["problem"]) == (1, "local", None)
    assert out["after"] == {"1": ["durable", "local"], "2": ["durable", "local"]}
    with ckptio.CheckpointManager(root) as plain:
        assert plain.all_steps() == {1: True, 2: True}
        names = plain.backend.listdir(plain.root.path)
        assert not [n for n in names if n.startswith(".step_")], names  # no dead leases left
    assert ckptio.verify(f"{root}/step_00000001") > 0 and ckptio.verify(f"{root}/step_00000002") > 0


def make_empty() -> dict[str, Any]:
    from ._states import make_state

    return make_state(0, 0, 1, empty=True)
