"""SIGKILL a process in the middle of saving a series; the last committed step must survive intact.

A worker saves steps forever through ``CheckpointManager`` (retention ``KeepLatest(2)``, sync and
async, sometimes overwriting a committed step) and is killed at a random moment. After every kill,
from this process: only committed steps are listed, the newest one loads and verifies, every
listed step holds exactly the values it saved (each tensor is filled with its step number), a
step the worker reported as saved synchronously is never lost, and uncommitted leftovers refuse to
load. The next worker resumes from what the previous one left, so later kills hit a directory
full of leftovers of earlier ones.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest

from .crash_child import check_state, fresh_state

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]


class Zygote:
    """The pre-imported worker factory of ``crash_child.py``, driven over pipes."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"crash worker died; see {self.log.name}")
        return line

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, cfg: dict[str, Any]) -> int:
        self._send("run " + json.dumps(cfg))
        return int(self._line().split()[1])

    def reap(self) -> int:
        self._send("reap")
        return int(self._line().split()[1])

    def close(self) -> None:
        try:
            self._send("quit")
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def zygote_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Zygote] = []

    def make(env: dict[str, str] | None = None) -> Zygote:
        z = Zygote(tmp_path / f"zygote{len(made)}.log", env)
        made.append(z)
        return z

    yield make
    for z in made:
        z.close()


def check_series(url: str, storage_options: dict[str, Any] | None, progress: list[str]) -> int | None:
    """All the post-crash assertions; returns the newest committed step."""
    bad = [line for line in progress if line.startswith("BAD")]
    assert not bad, bad
    with ckptio.CheckpointManager(url, storage_options=storage_options) as mgr:
        steps = mgr.steps()
        latest = mgr.latest_step()
        assert latest == (steps[-1] if steps else None), (latest, steps)
        # a synchronous save that returned is durable: it (or a newer step) is committed
        saved = [int(line.split()[1]) for line in progress if line.startswith("saved")]
        if saved and not any(line.startswith("staged") for line in progress):
            assert latest is not None and latest >= saved[-1], (latest, saved[-1])
        for step in steps:
            state = fresh_state()
            try:
                mgr.load(state, step)
            except ckptio.CheckpointNotFoundError:
                continue  # removed by the worker's background retention between listing and loading
            problem = check_state(state, step)
            assert problem is None, f"step {step}: {problem}"
        if latest is not None:
            assert ckptio.verify(str(mgr.url_of(latest)), storage_options=storage_options) > 0
        for step, committed in mgr.all_steps().items():
            if not committed and step not in steps:
                with pytest.raises(ckptio.CheckpointNotFoundError):  # Incomplete... is a subclass
                    mgr.load(fresh_state(), step)
        return latest


def crash_loop(
    zygote: Zygote,
    url: str,
    tmp: Path,
    kills: int,
    seed: int,
    storage_options: dict[str, Any] | None = None,
    max_delay: float = 0.6,
) -> list[int | None]:
    rng = random.Random(seed)
    latests: list[int | None] = []
    for i in range(kills):
        progress = tmp / f"progress{i}.txt"
        mode = "async" if i % 3 == 2 else "sync"
        pid = zygote.run(
            {
                "url": url,
                "mode": mode,
                "seed": seed + i,
                "progress": str(progress),
                "storage_options": storage_options,
            }
        )
        # random moments counted from the end of the resume, so that every kill lands in the save loop
        deadline = time.monotonic() + 60
        while (
            "started" not in (progress.read_text() if progress.exists() else "")
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        status = zygote.reap()
        lines = progress.read_text().splitlines() if progress.exists() else []
        assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0), (
            f"worker {i} failed before the kill (exit {os.WEXITSTATUS(status)}); see {zygote.log.name}"
        )
        if mode == "async":
            lines = [line.replace("saved", "staged") for line in lines]
        latests.append(check_series(url, storage_options, lines))
    return latests


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_local(tmp_path: Path, zygote_factory: Any) -> None:
    root = tmp_path / "series"
    latests = crash_loop(zygote_factory(), str(root), tmp_path, kills=30, seed=1234)
    committed = [x for x in latests if x is not None]
    print("newest committed step after each kill:", latests)
    assert committed and committed[-1] >= 10, f"too few saves got through: {latests}"
    # the series only moves forward: a later kill never loses an earlier committed step's successor
    assert committed == sorted(committed), latests


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(300)
def test_sigkill_s3(tmp_path: Path, zygote_factory: Any, s3_server: Any) -> None:
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/series"
    opts = s3_server.storage_options()
    try:
        ckptio.CheckpointManager(url, storage_options=opts).close()
    except ckptio.BackendNotFoundError as exc:
        pytest.skip(f"no s3:// backend installed yet: {exc}")
    latests = crash_loop(
        zygote_factory(s3_server.env()), url, tmp_path, kills=8, seed=99, storage_options=opts, max_delay=1.5
    )
    assert any(x is not None for x in latests), latests


@pytest.mark.parametrize("new_copy_complete", [True, False])
def test_crash_between_the_renames_of_a_replacement(tmp_path: Path, new_copy_complete: bool) -> None:
    """Saving over a committed step renames it aside, then renames the new copy in: a crash between
    the two (too narrow for random kills to hit) must not lose the step."""
    from .crash_child import make_state

    root = tmp_path / "series"
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(5, make_state(5))
    staged = tmp_path / "staged"
    ckptio.save(make_state(5), str(staged))
    if not new_copy_complete:
        (staged / "manifest.json").unlink()
    # the state a crash leaves: old copy aside, new copy staged, no step_00000005
    (root / "step_00000005").rename(root / ".step_00000005.ckptio-old")
    staged.rename(root / ".step_00000005.ckptio-partial")
    with ckptio.CheckpointManager(str(root), retention=ckptio.KeepLatest(1)) as mgr:
        state = fresh_state()
        mgr.load(state)  # resuming finds step 5 again
        assert check_state(state, 5) is None and mgr.steps() == [5]
        mgr.save(6, make_state(6))
    # the leftovers are gone; step 5 stays because the run resumed from it
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005", "step_00000006"]
