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
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch

from .crash_child import check_state, fresh_state
from .zygote import Zygote

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def zygote_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Zygote] = []

    def make(env: dict[str, str] | None = None) -> Zygote:
        z = Zygote(CHILD, tmp_path / f"zygote{len(made)}.log", env)
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


def kill_after_start(zygote: Zygote, pid: int, progress: Path, delay: float, i: int) -> list[str]:
    """SIGKILL worker ``i`` ``delay`` seconds after it reports "started"; return its progress lines.

    A worker that exited with an error before the kill fails the test (its log is named).
    """
    deadline = time.monotonic() + 60
    while (
        "started" not in (progress.read_text() if progress.exists() else "") and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    status = zygote.reap()
    lines = progress.read_text().splitlines() if progress.exists() else []
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0), (
        f"worker {i} failed before the kill (exit {os.WEXITSTATUS(status)}); see {zygote.log.name}"
    )
    return lines


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
        lines = kill_after_start(zygote, pid, progress, rng.uniform(0.0, max_delay), i)
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


@pytest.mark.parametrize("naming", ["tokened", "legacy"])
@pytest.mark.parametrize("new_copy_complete", [True, False])
def test_crash_between_the_renames_of_a_replacement(
    tmp_path: Path, new_copy_complete: bool, naming: str
) -> None:
    """Saving over a committed step renames it aside, then renames the new copy in: a crash between
    the two (too narrow for random kills to hit) must not lose the step. Leftovers carry the
    writer's token and a lease (dead here); ckptio 0.1's untokened ones count as dead."""
    from .crash_child import make_state

    root = tmp_path / "series"
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(5, make_state(5))
    staged = tmp_path / "staged"
    ckptio.save(make_state(5), str(staged))
    if not new_copy_complete:
        (staged / "manifest.json").unlink()
    # the state a crash leaves: old copy aside, new copy staged, no step_00000005
    tag = "" if naming == "legacy" else ".0a1b2c3d4e5f"
    (root / "step_00000005").rename(root / f".step_00000005{tag}.ckptio-old")
    staged.rename(root / f".step_00000005{tag}.ckptio-partial")
    if naming == "tokened":
        _dead_lease(root / f".step_00000005{tag}.ckptio-lease", tag[1:])
    with ckptio.CheckpointManager(str(root), retention=ckptio.KeepLatest(1)) as mgr:
        state = fresh_state()
        mgr.load(state)  # resuming finds step 5 again
        assert check_state(state, 5) is None and mgr.steps() == [5]
        mgr.save(6, make_state(6))
    # the leftovers are gone; step 5 stays because the run resumed from it
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005", "step_00000006"]


# -- SIGKILL during the other publications (issue 11): old state or new, never a mix, never nothing --
def _beside(url: str) -> list[str]:
    """Staging, moved-aside and lease entries of ``url`` (all dead once the worker is killed)."""
    p = Path(url)
    return sorted(n for n in os.listdir(p.parent) if n.startswith(f".{p.name}."))


def kill_loop(
    zygote: Zygote,
    cfg: dict[str, Any],
    tmp: Path,
    check: Any,
    kills: int,
    seed: int,
    max_delay: float,
    start: int = 1,
) -> list[int]:
    """Start a publishing loop, SIGKILL it at a random moment, ``check`` what the URL holds; again.

    ``check(saved, base)`` gets the versions the worker reported published and the version the
    URL held before it started; it returns the version the URL holds now (the next worker goes on
    from there), so a kill that lost a published version, or left nothing, fails at once.
    """
    rng = random.Random(seed)
    seen = []
    base = start - 1
    for i in range(kills):
        progress = tmp / f"{cfg['kind']}{i}.txt"
        pid = zygote.run({**cfg, "progress": str(progress), "start": base + 1, "seed": seed + i})
        lines = kill_after_start(zygote, pid, progress, rng.uniform(0.0, max_delay), i)
        assert not [line for line in lines if line.startswith("BAD")], lines
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        base = check(saved, base)
        seen.append(base)
    return seen


def _between(saved: list[int], base: int) -> tuple[int, int]:
    """What a URL may hold after a kill: the last published version or the one in flight."""
    last = saved[-1] if saved else base
    return last, last + 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_overwrite_at_a_plain_url(tmp_path: Path, zygote_factory: Any) -> None:
    """Finding 3: ``ckptio.save(..., overwrite=True)`` killed between its two renames left nothing
    at the URL (both copies hidden); the next load or save now puts a whole one back."""
    from .crash_child import make_state

    url = str(tmp_path / "ck")
    ckptio.save(make_state(0), url)

    def check(saved: list[int], base: int) -> int:
        state = fresh_state()
        ckptio.load(state, url)  # the next touch: finishes or undoes an interrupted replacement
        k = state["step"]
        assert k in _between(saved, base), (k, saved, base)
        assert check_state(state, k) is None
        assert ckptio.verify(url) > 0
        assert _beside(url) == [], _beside(url)
        return int(k)

    seen = kill_loop(zygote_factory(), {"kind": "overwrite", "url": url}, tmp_path, check, 10, 7, 0.3)
    assert seen[-1] >= 5, f"too few saves got through: {seen}"


def _native_sources(tmp: Path, values: list[int]) -> list[str]:
    out = []
    for v in values:
        path = tmp / f"src{v}"
        ckptio.save({"model": {f"w{j}": torch.full((64, 64), float(v)) for j in range(6)}}, str(path))
        out.append(str(path))
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_consolidate_into_an_existing_directory(tmp_path: Path, zygote_factory: Any) -> None:
    """Finding 4: killed after its first shard was moved in, ``consolidate`` left a new shard beside
    old ones and no index. Each export here has another shard layout (6, 3 or 1 files); after
    every kill the directory is one export, whole."""
    pytest.importorskip("ckptio_safetensors")
    from ckptio_safetensors import consolidate

    values = [10, 11, 12]
    sources = _native_sources(tmp_path, values)
    shard_sizes = ["20KB", "40KB", "5GB"]
    n_files = [6, 3, 1]
    url = str(tmp_path / "hf")
    consolidate(sources[0], url, max_shard_size=shard_sizes[0], progress=False)

    def check(saved: list[int], base: int) -> int:
        got = {f"w{j}": torch.zeros(64, 64) for j in range(6)}
        ckptio.load(got, url)  # the next touch
        held = {float(t.min()) for t in got.values()} | {float(t.max()) for t in got.values()}
        assert len(held) == 1, f"a mix of exports: {sorted(held)}"
        v = int(held.pop())
        options = {values[k % 3]: k for k in _between(saved, base)}
        assert v in options, (v, saved, base)
        k = options[v]
        index = json.loads((Path(url) / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in Path(url).glob("*.safetensors"))
        assert sorted(set(index["weight_map"].values())) == files and len(files) == n_files[k % 3], files
        assert _beside(url) == [], _beside(url)
        return k

    cfg = {"kind": "consolidate", "url": url, "sources": sources, "shard_sizes": shard_sizes}
    seen = kill_loop(zygote_factory(), cfg, tmp_path, check, 10, 11, 0.3)
    assert len(set(seen)) > 3, f"too few exports got through: {seen}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_cp_overwrite(tmp_path: Path, zygote_factory: Any) -> None:
    """``ckptio cp SRC DST --overwrite`` killed anywhere: DST is the old copy or the new one."""
    from ckptio import cli

    from .crash_child import make_state

    steps = [100, 101, 102]
    sources = []
    for i, step in enumerate(steps):  # three layouts: 1, 2 and 4 data files
        path = tmp_path / f"src{step}"
        ckptio.save(make_state(step), str(path), thread_count=2**i)
        sources.append(str(path))
    url = str(tmp_path / "copy")
    assert cli.main(["cp", sources[0], url, "--no-progress"]) == 0

    def check(saved: list[int], base: int) -> int:
        state = fresh_state()
        ckptio.load(state, url)  # the next touch
        options = {steps[k % 3]: k for k in _between(saved, base)}
        assert state["step"] in options, (state["step"], saved, base)
        assert check_state(state, state["step"]) is None
        assert ckptio.verify(url) > 0
        m = ckptio.manifest(url)
        assert sorted(os.listdir(url)) == sorted([*m.files, "manifest.json"])
        assert _beside(url) == [], _beside(url)
        return options[state["step"]]

    seen = kill_loop(
        zygote_factory(), {"kind": "cp", "url": url, "sources": sources}, tmp_path, check, 10, 5, 0.4
    )
    assert len(set(seen)) > 3, f"too few copies got through: {seen}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_the_latest_rewrite(tmp_path: Path, zygote_factory: Any) -> None:
    """Finding 5: SIGKILL while ``latest`` was rewritten left a ``.latest.*.tmp`` file forever.
    Tiny saves make the rewrite a large part of each save. After every kill: the pointer is
    absent or names a step, whole; after the next save nothing temporary is left and it is exact."""
    from ckptio.manager import step_name

    from .crash_child import small_state

    root = tmp_path / "series"

    def check(saved: list[int], base: int) -> int:
        pointer = root / "latest"
        if pointer.exists():
            assert re.fullmatch(r"step_\d{8}\n", pointer.read_text()), pointer.read_text()
        with ckptio.CheckpointManager(str(root), retention=ckptio.KeepLatest(2)) as mgr:
            steps = mgr.steps()
            latest = mgr.latest_step()
            assert steps and latest == steps[-1], (latest, steps)
            if saved:
                assert latest >= saved[-1], (latest, saved)
            got = small_state(-1)
            mgr.load(got)
            assert torch.equal(got["w"], small_state(latest)["w"]) and got["step"] == latest
            mgr.save(latest + 1, small_state(latest + 1))  # the next touch
        names = os.listdir(root)
        assert not [n for n in names if n.startswith(".latest")], names
        assert not [n for n in names if n.startswith(".step_")], names
        assert pointer.read_text() == step_name(latest + 1) + "\n"
        return latest + 1

    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(0, small_state(0))
    seen = kill_loop(zygote_factory(), {"kind": "latest", "url": str(root)}, tmp_path, check, 10, 3, 0.3)
    assert seen[-1] >= 12, f"too few saves got through: {seen}"


def _dead_lease(path: Path, token: str) -> None:
    """A lease as a SIGKILLed writer leaves it: this host, a pid that no longer runs."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": 0, "token": token}
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("touch", ["load", "save"])
@pytest.mark.parametrize("new_copy_complete", [True, False])
def test_crash_between_the_renames_at_a_plain_url(
    tmp_path: Path, new_copy_complete: bool, touch: str
) -> None:
    """Finding 3, the window random kills rarely hit: the old copy moved aside, the new one staged,
    nothing at the URL. The next load or save of that URL, not only a manager's, puts a whole copy
    back (the new one when it has its manifest) and drops the leftovers."""
    from .crash_child import make_state

    url = tmp_path / "ck"
    ckptio.save(make_state(1), str(url))
    ckptio.save(make_state(2), str(tmp_path / "staged"))
    if not new_copy_complete:
        (tmp_path / "staged" / "manifest.json").unlink()
    token = "a1b2c3d4e5f6"
    url.rename(tmp_path / f".ck.{token}.ckptio-old")
    (tmp_path / "staged").rename(tmp_path / f".ck.{token}.ckptio-partial")
    _dead_lease(tmp_path / f".ck.{token}.ckptio-lease", token)
    expected = 2 if new_copy_complete else 1
    if touch == "save":
        with pytest.raises(ckptio.CheckpointError, match="already holds a committed checkpoint"):
            ckptio.save(make_state(3), str(url), overwrite=False)  # the recovered copy is there
    state = fresh_state()
    ckptio.load(state, str(url))
    assert check_state(state, expected) is None
    assert sorted(os.listdir(tmp_path)) == ["ck"]
