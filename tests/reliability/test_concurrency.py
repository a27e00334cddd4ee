"""Several writers and removers on one root, as when a restarted job overlaps the old one.

Two real processes save steps into one root at the same time (plain ``ckptio.save`` to
``step_N``, overlapping step numbers, with and without overwrite), while a third runs
``ckptio rm`` on those steps. Afterwards every committed step must verify and hold the values of
exactly one save (each tensor of a save is filled with the same writer-and-step number), and
every save that reported success must have published a whole checkpoint (or been replaced by a
later whole one). Then the run lock: a second ``CheckpointManager`` on a live run is refused with
the holder named, and ``takeover=True`` takes the run over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ckptio
import pytest
import torch

DURATION_S = float(os.environ.get("CKPTIO_CONCURRENCY_S", "10"))

WRITER = textwrap.dedent(
    """
    import json, random, sys, time
    import torch, ckptio
    root, wid, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(wid)
    end = time.time() + duration
    out = []
    while time.time() < end:
        step = rng.randrange(8)
        value = float(wid * 1000 + step)
        state = {"a": torch.full((64, 64), value), "b": torch.full((4096,), value), "tag": value}
        overwrite = rng.random() < 0.7
        try:
            ckptio.save(state, f"{root}/step_{step:08d}", overwrite=overwrite, thread_count=2)
            out.append(["ok", step, value])
        except ckptio.CheckpointError as exc:
            out.append(["err", step, type(exc).__name__])
    print(json.dumps(out))
    """
)

REMOVER = textwrap.dedent(
    """
    import random, subprocess, sys, time
    root, duration, cli = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    rng = random.Random(7)
    end = time.time() + duration
    n = 0
    while time.time() < end:
        step = rng.randrange(8)
        subprocess.run([cli, "rm", root, str(step), "--force"], capture_output=True)
        n += 1
        time.sleep(0.05)
    print(n)
    """
)


def _check_step(path: Path) -> float:
    """Verify a committed step and return the one value all of its tensors hold."""
    ckptio.verify(str(path))
    dest = {"a": torch.empty(64, 64), "b": torch.empty(4096), "tag": None}
    ckptio.load(dest, str(path))
    value = float(dest["tag"])
    assert torch.all(dest["a"] == value) and torch.all(dest["b"] == value), f"{path} mixes two saves"
    return value


@pytest.mark.slow
@pytest.mark.multirank
def test_two_writers_and_a_remover_on_one_root(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    cli = str(Path(sys.executable).parent / "ckptio")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(w), str(DURATION_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in (1, 2)
    ]
    remover = subprocess.Popen(
        [sys.executable, "-c", REMOVER, str(root), str(DURATION_S), cli],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    results = []
    try:
        for p in writers:
            out, err = p.communicate(timeout=DURATION_S + 120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        out, err = remover.communicate(timeout=DURATION_S + 120)
        assert remover.returncode == 0, err[-3000:]
    finally:
        for p in (*writers, remover):
            if p.poll() is None:
                p.kill()
    oks = sum(1 for r in results for kind, *_ in r if kind == "ok")
    errors = {name for r in results for kind, _, name in r if kind == "err"}
    assert oks > 20, f"too few saves succeeded to prove anything: {oks}"
    assert errors <= {"CheckpointError", "ConcurrentWriteError"}, errors

    committed = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("step_") and (entry / "manifest.json").exists():
            value = _check_step(entry)
            assert int(value) % 1000 == int(entry.name.removeprefix("step_")), (entry, value)
            committed += 1
    # leftovers of the finished writers are reclaimed by the next touch of each step
    for step in range(8):
        path = root / f"step_{step:08d}"
        if path.exists():
            ckptio.save({"x": torch.ones(2)}, str(path))
    leftovers = [e.name for e in root.iterdir() if ".ckptio-" in e.name]
    assert leftovers == [], leftovers
    print(f"{oks} saves succeeded, {committed} steps committed at the end, {len(errors)} error kinds")


def test_commit_never_merges_into_a_step_that_appeared(tmp_path: Path) -> None:
    """overwrite=False: of two saves of one step, one wins whole and the other is refused."""
    path = tmp_path / "step"
    ckptio.save({"w": torch.full((8,), 1.0)}, str(path), overwrite=False)
    with pytest.raises(ckptio.CheckpointError, match="already holds a committed checkpoint"):
        ckptio.save({"w": torch.full((8,), 2.0)}, str(path), overwrite=False)
    dest = {"w": torch.empty(8)}
    ckptio.load(dest, str(path))
    assert torch.all(dest["w"] == 1.0)


def test_saving_never_replaces_a_run_root(tmp_path: Path) -> None:
    """Finding 1: a directory without a manifest (a run root) is never replaced by a save."""
    root = tmp_path / "run"
    with ckptio.CheckpointManager(str(root)) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, {"w": torch.full((4,), float(step))})
    for overwrite in (False, True):
        with pytest.raises(ckptio.CheckpointError, match="not a ckptio checkpoint"):
            ckptio.save({"w": torch.zeros(4)}, str(root), overwrite=overwrite)
    with ckptio.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [10, 20, 30]


def test_second_manager_is_refused_and_takeover_works(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first = ckptio.CheckpointManager(str(root))
    first.save(1, {"w": torch.ones(4)})
    lock = json.loads((root / ".ckptio-lock").read_text())
    assert lock["pid"] == os.getpid() and lock["host"]
    # another process, same root: refused, naming this process
    code = textwrap.dedent(
        f"""
        import torch, ckptio
        mgr = ckptio.CheckpointManager({str(root)!r})
        try:
            mgr.save(2, {{"w": torch.ones(4)}})
        except ckptio.RunLockedError as exc:
            print("REFUSED", exc)
        finally:
            mgr.close()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and f"pid {os.getpid()}" in out.stdout, out.stdout + out.stderr
    assert "takeover=True" in out.stdout
    # a reader needs no lock
    with ckptio.CheckpointManager(str(root)) as reader:
        dest = {"w": torch.empty(4)}
        reader.load(dest)
    # takeover: the new manager writes; the old one learns at its next save (after a heartbeat)
    second = ckptio.CheckpointManager(str(root), takeover=True)
    second.save(3, {"w": torch.full((4,), 3.0)})
    assert first._run_lock is not None
    first._run_lock.interval = 0.05  # do not wait 10 s for the old holder's next heartbeat
    first._run_lock._stop.set()
    first._run_lock._thread.join()  # type: ignore[union-attr]
    first._run_lock._stop.clear()
    first._run_lock.start(verify=True)
    deadline = time.time() + 10
    while first._run_lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ckptio.RunLockedError, match="taken over"):
        first.save(4, {"w": torch.ones(4)})
    first.close()
    second.close()
    assert not (root / ".ckptio-lock").exists()
    with ckptio.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [1, 3]


def test_a_dead_holder_does_not_block_the_run(tmp_path: Path) -> None:
    root = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import os, torch, ckptio
        mgr = ckptio.CheckpointManager({str(root)!r})
        mgr.save(1, {{"w": torch.ones(4)}})
        os._exit(0)  # dies holding the lock, like a SIGKILLed job
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (root / ".ckptio-lock").exists()
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(2, {"w": torch.ones(4)})
        assert mgr.steps() == [1, 2]


def test_latest_pointer_failure_after_commit_is_a_warning(tmp_path: Path) -> None:
    """Finding 5: the step is committed; a failed pointer update must not fail the save."""
    root = tmp_path / "run"
    with ckptio.CheckpointManager(str(root), retention=ckptio.KeepLatest(1)) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
        real = mgr.backend.write_bytes

        def full_disk(path: str, data: bytes) -> None:
            if path.endswith("/latest"):
                raise ckptio.StorageError(f"{path}: no space left on device")
            real(path, data)

        mgr.backend.write_bytes = full_disk  # type: ignore[method-assign]
        mgr.save(2, {"w": torch.full((4,), 2.0)})  # must not raise
        mgr.backend.write_bytes = real  # type: ignore[method-assign]
        mgr._deleter.join()
        assert mgr.latest_step() == 2 and mgr.steps() == [2]  # retention still ran


def test_stale_latest_temp_files_are_removed(tmp_path: Path) -> None:
    """Finding 5: a SIGKILL during the pointer rewrite leaves ``.latest.*.tmp``; the next holder drops it."""
    root = tmp_path / "run"
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    (root / ".latest.deadbeef.tmp").write_text("step_000")
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(2, {"w": torch.ones(4)})
    assert not (root / ".latest.deadbeef.tmp").exists()


@pytest.mark.parametrize(
    "metrics, metadata, match",
    [
        ({"loss": torch.tensor([1.0, 2.0])}, None, "metric 'loss'"),
        ({"loss": "low"}, None, "metric 'loss'"),
        (None, {"x": object()}, "JSON values"),
        (None, {"x": float("nan")}, "JSON values"),
    ],
)
def test_bad_metrics_and_metadata_fail_before_writing(
    tmp_path: Path, metrics: object, metadata: object, match: str
) -> None:
    """Finding 12: refused with a ckptio error before any data is written (no staging left)."""
    root = tmp_path / "run"
    with ckptio.CheckpointManager(str(root)) as mgr:
        with pytest.raises(ckptio.CheckpointError, match=match):
            mgr.save(1, {"w": torch.ones(4)}, metrics=metrics, metadata=metadata)  # type: ignore[arg-type]
    assert [e.name for e in root.iterdir() if e.name.startswith(".step")] == []


def test_non_finite_and_numpy_metrics_survive(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    root = tmp_path / "run"
    best = ckptio.KeepBest(1, "loss")
    with ckptio.CheckpointManager(str(root), retention=best) as mgr:
        mgr.save(1, {"w": torch.ones(4)}, metrics={"loss": np.float32(0.5)})
        mgr.save(2, {"w": torch.ones(4)}, metrics={"loss": float("nan")})
        mgr.save(3, {"w": torch.ones(4)}, metrics={"loss": torch.tensor(float("inf"))})
        mgr._deleter.join()
    with ckptio.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [1, 3]  # best finite loss, and the newest
        import math

        assert math.isinf(mgr.metrics(3)["loss"]) and mgr.metrics(1)["loss"] == 0.5


def test_interrupted_overwrite_of_a_plain_url_is_rolled_forward_or_back(tmp_path: Path) -> None:
    """Finding 3: killed between its two renames, an overwrite left nothing at the URL."""
    url = tmp_path / "ckpt"
    ckptio.save({"w": torch.full((4,), 1.0)}, str(url))
    new = tmp_path / "new"
    ckptio.save({"w": torch.full((4,), 2.0)}, str(new))
    # the state a SIGKILL between the renames leaves: old copy aside, complete new copy staged,
    # the owner dead (no live lease)
    url.rename(tmp_path / ".ckpt.0123456789ab.ckptio-old")
    new.rename(tmp_path / ".ckpt.0123456789ab.ckptio-partial")
    dest = {"w": torch.empty(4)}
    ckptio.load(dest, str(url))  # the next touch rolls forward
    assert torch.all(dest["w"] == 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # killed before the new copy had its manifest: rolled back
    url.rename(tmp_path / ".ckpt.0123456789ab.ckptio-old")
    (tmp_path / ".ckpt.0123456789ab.ckptio-partial").mkdir()
    (tmp_path / ".ckpt.0123456789ab.ckptio-partial" / "__0_0.bin").write_bytes(b"x" * 16)
    ckptio.load(dest, str(url))
    assert torch.all(dest["w"] == 2.0)
    ckptio.save({"w": torch.full((4,), 3.0)}, str(url))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_live_writers_staging_is_never_removed(tmp_path: Path) -> None:
    """Finding 2: cleanup by another writer (or ``ckptio rm``) spares a save in flight."""
    from ckptio.backend import Backend
    from ckptio.checkpoint import open_backend
    from ckptio.commit import Target, recover

    url = tmp_path / "ckpt"
    backend: Backend
    _, backend = open_backend(str(url))
    target = Target.prepare(backend, str(url), overwrite=True, what="test")
    try:
        (Path(target.data_dir) / "data.bin").write_bytes(b"1234")
        recover(backend, str(url))  # this process is alive: nothing of it is touched
        assert Path(target.data_dir, "data.bin").exists()
        ckptio.save({"w": torch.ones(2)}, str(url))  # another save of the same URL meanwhile
        assert Path(target.data_dir, "data.bin").exists()
        with pytest.raises(ckptio.ConcurrentWriteError):
            target.check_files({"data.bin": {"size": 4}, "gone.bin": {"size": 1}})
    finally:
        target.abort()
    assert not Path(target.data_dir).exists()


def test_load_during_overwrite_never_returns_a_mix(tmp_path: Path) -> None:
    """Finding 15: with verify=False a load racing an overwrite returned a mix of two saves."""
    import threading

    url = str(tmp_path / "ckpt")
    ckptio.save({"a": torch.full((1 << 16,), 0.0), "b": torch.full((1 << 16,), 0.0)}, url)
    stop = threading.Event()

    def overwrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            v = float(i)
            ckptio.save({"a": torch.full((1 << 16,), v), "b": torch.full((1 << 16,), v)}, url)

    t = threading.Thread(target=overwrite)
    t.start()
    outcomes = {"ok": 0, "replaced": 0}
    try:
        deadline = time.time() + 4
        while time.time() < deadline:
            dest = {"a": torch.empty(1 << 16), "b": torch.empty(1 << 16)}
            try:
                ckptio.load(dest, url, verify=False)
            except (ckptio.ConcurrentWriteError, ckptio.CheckpointNotFoundError):
                outcomes["replaced"] += 1
                continue
            value = float(dest["a"][0])
            assert torch.all(dest["a"] == value) and torch.all(dest["b"] == value), "a mix of two saves"
            outcomes["ok"] += 1
    finally:
        stop.set()
        t.join()
    assert outcomes["ok"] > 0, outcomes


def test_a_symlinked_root_is_saved_through_not_replaced(tmp_path: Path) -> None:
    """Finding 16: saving to a path that is a symlink to another disk kept the data, lost the link."""
    real = tmp_path / "other_disk" / "ckpt"
    real.parent.mkdir()
    link = tmp_path / "ckpt"
    link.symlink_to(real, target_is_directory=True)
    ckptio.save({"w": torch.ones(4)}, str(link))
    ckptio.save({"w": torch.full((4,), 2.0)}, str(link))  # an overwrite too
    assert link.is_symlink() and (real / "manifest.json").exists()
    dest = {"w": torch.empty(4)}
    ckptio.load(dest, str(link))
    assert torch.all(dest["w"] == 2.0)


def test_a_symlinked_step_never_loses_its_target(tmp_path: Path) -> None:
    """Finding 7: a step directory symlinked to another run's checkpoint: retention or ``rm``
    deleted that checkpoint's manifest.json. Now the link is not a step, and only the link goes."""
    other = tmp_path / "other_run_ckpt"
    ckptio.save({"w": torch.ones(4)}, str(other))
    root = tmp_path / "run"
    with ckptio.CheckpointManager(str(root), retention=ckptio.KeepLatest(1)) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
        (root / "step_00000000").symlink_to(other, target_is_directory=True)
        assert mgr.steps() == [1]  # a link is never a committed step
        mgr.save(2, {"w": torch.ones(4)})
        mgr.save(3, {"w": torch.ones(4)})
        mgr._deleter.join()
        assert mgr.steps() == [3]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ckptio"), "rm", str(root), "0", "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (other / "manifest.json").exists(), out.stdout + out.stderr
    ckptio.verify(str(other))
