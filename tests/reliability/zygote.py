"""A pre-imported worker factory ("zygote") driven over pipes, shared by the SIGKILL tests.

The child (``crash_child.py``, ``tests/dcp/dcp_crash_child.py``) imports torch and ckptio once,
prints ``ready``, then forks one worker per ``run <json>`` line (answering ``pid N``) and reaps it
on ``reap`` (answering ``status N``); ``quit`` ends it. Forking from a warm process keeps the
kill tests fast: a fresh interpreter would spend seconds importing before each kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class Zygote:
    """One child process running ``child``; its stderr goes to ``log``."""

    def __init__(self, child: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(child)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )
        assert self.line() == "ready"

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline().strip()
        if not text:
            raise RuntimeError(f"the crash zygote died; see {self.log.name}")
        return text

    def send(self, text: str) -> str:
        """Send one command and return the child's one-line answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.line()

    def run(self, cfg: dict[str, Any]) -> int:
        """Fork a worker for ``cfg``; its pid."""
        return int(self.send("run " + json.dumps(cfg)).split()[1])

    def reap(self) -> int:
        """Wait for the last worker; its wait status."""
        return int(self.send("reap").split()[1])

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()
