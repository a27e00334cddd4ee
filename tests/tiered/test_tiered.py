"""TieredCheckpointManager in one process: round trips, drains, retention per tier, fallbacks, ``ckptio ls``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import ckptio
import pytest
from ckptio import tiered
from ckptio.tiered import DrainError, TieredCheckpointManager

from ._states import check_state, make_state


def _load(mgr: TieredCheckpointManager, step: int | str = "latest") -> tuple[dict[str, Any], Any]:
    state = make_state(0, 0, 1, empty=True)
    result = mgr.load(state, step)
    return state, result


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Drains wait at their first upload until the event is set (set on teardown)."""
    opened = threading.Event()
    real = tiered._upload_one

    def upload(*args: Any) -> int:
        assert opened.wait(20), "the test never opened the gate"
        return real(*args)

    monkeypatch.setattr(tiered, "_upload_one", upload)
    yield opened
    opened.set()


def test_round_trip_on_s3(tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    root, local = f"s3://{s3_bucket}/run", str(tmp_path / "nvme")
    with TieredCheckpointManager(root, local=local) as mgr:
        for step in (10, 20):
            result = mgr.save(step, make_state(step, 0, 1), metrics={"loss": 1.0 / step})
            assert result is not None and result.step == step and result.url.endswith(f"nvme/step_{step:08d}")
        mgr.wait(durable=True)
        assert mgr.step_locations() == {10: {"local", "durable"}, 20: {"local", "durable"}}
        assert mgr.steps() == [10, 20] and mgr.latest_step() == 20
        assert mgr.metrics(20) == {"loss": 1.0 / 20}
    # the durable copy is a whole, ordinary checkpoint
    assert ckptio.verify(f"{root}/step_00000020") > 0
    with ckptio.CheckpointManager(root) as plain:
        assert plain.steps() == [10, 20] and plain.latest_step() == 20
    # resume: every byte from the local tier
    with TieredCheckpointManager(root, local=local) as mgr:
        state, result = _load(mgr)
        assert check_state(state, 20, 0) is None
        assert result.step == 20 and result.source == "local" and result.tier_bytes["durable"] == 0
        assert mgr.resumed_from == 20
    # a replaced machine: the local tier is empty, every byte comes from S3
    shutil.rmtree(local)
    with TieredCheckpointManager(root, local=local) as mgr:
        assert mgr.step_locations() == {10: {"durable"}, 20: {"durable"}}
        state, result = _load(mgr, 10)
        assert check_state(state, 10, 0) is None
        assert result.source == "durable" and result.tier_bytes["local"] == 0


def test_async_save_blocks_only_for_staging(tmp_path: Path) -> None:
    with TieredCheckpointManager(
        str(tmp_path / "durable"), local=str(tmp_path / "local"), async_save=True
    ) as mgr:
        state = make_state(1, 0, 1)
        assert mgr.save(1, state) is None
        state["w"].add_(1.0)  # training goes on: the staged copy is what gets saved
        mgr.wait()
        assert mgr.last_result is not None and "staging (blocking)" in mgr.last_result.timings
        assert 1 in mgr.step_locations()
        mgr.wait(durable=True)
        assert mgr.step_locations() == {1: {"local", "durable"}}
    with TieredCheckpointManager(str(tmp_path / "durable"), local=str(tmp_path / "empty")) as mgr:
        loaded, result = _load(mgr)
        assert check_state(loaded, 1, 0) is None and result.source == "durable"


def test_retention_per_tier_keeps_undrained_and_resumed_steps(tmp_path: Path, gate: threading.Event) -> None:
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    opts: dict[str, Any] = {"retention": ckptio.KeepLatest(1), "local_retention": ckptio.KeepLatest(1)}
    gate.set()
    with TieredCheckpointManager(root, local=local, **opts) as mgr:
        mgr.save(1, make_state(1, 0, 1))
        mgr.save(2, make_state(2, 0, 1))
    gate.clear()
    with TieredCheckpointManager(root, local=local, **opts) as mgr:
        assert mgr.step_locations() == {2: {"local", "durable"}}
        _load(mgr)
        assert mgr.resumed_from == 2
        for step in (3, 4, 5):
            mgr.save(step, make_state(step, 0, 1))
        # the drains wait at the gate: nothing new is durable, so the local tier keeps it all
        assert mgr.step_locations() == {
            2: {"local", "durable"},
            3: {"local"},
            4: {"local"},
            5: {"local"},
        }
        gate.set()
        mgr.wait(durable=True)
    with TieredCheckpointManager(root, local=local, **opts) as mgr:
        # each tier kept its newest step and the step this run resumed from
        assert mgr.step_locations() == {2: {"local", "durable"}, 5: {"local", "durable"}}


def test_evict_undrained_lets_local_retention_go_first(tmp_path: Path, gate: threading.Event) -> None:
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    with TieredCheckpointManager(
        root, local=local, local_retention=ckptio.KeepLatest(1), evict_undrained=True
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_state(step, 0, 1))
        # step 1 is being copied (its files are in use); 2 is evicted before it is durable
        _eventually(lambda: sorted(mgr.step_locations()) == [1, 3], mgr.step_locations)
        gate.set()
        mgr.wait(durable=True)  # the drain of step 2 finds nothing to copy: not an error here
    with TieredCheckpointManager(root, local=local) as mgr:
        assert mgr.step_locations() == {1: {"durable"}, 3: {"local", "durable"}}


def _eventually(cond: Any, show: Any, timeout: float = 30.0) -> None:
    """Retention deletes in a background thread: wait for its effect."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, show()
        time.sleep(0.05)


def test_a_corrupt_local_shard_is_read_from_the_durable_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, local = str(tmp_path / "durable"), tmp_path / "local"
    with TieredCheckpointManager(root, local=str(local)) as mgr:
        mgr.save(7, make_state(7, 0, 1))
        mgr.wait(durable=True)
    biggest = max((local / "step_00000007").glob("*.bin"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    biggest.write_bytes(bytes(data))
    with (
        caplog.at_level(logging.WARNING, logger="ckptio.tiered"),
        TieredCheckpointManager(root, local=str(local)) as mgr,
    ):
        state, result = _load(mgr)
    assert check_state(state, 7, 0) is None
    assert result.fallbacks == [biggest.name] and result.source in ("both", "durable")
    assert result.tier_bytes["durable"] >= biggest.stat().st_size
    assert any("is damaged" in r.getMessage() and biggest.name in r.getMessage() for r in caplog.records)


def test_a_failed_drain_is_retried_then_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = tiered._upload_one

    def flaky(*args: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1 or fail.is_set():
            raise ckptio.StorageError("simulated outage")
        return real(*args)

    fail = threading.Event()
    monkeypatch.setattr(tiered, "_upload_one", flaky)
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    with TieredCheckpointManager(root, local=local, drain_attempts=2, drain_backoff=0.01) as mgr:
        mgr.save(1, make_state(1, 0, 1))
        mgr.wait(durable=True)  # the first try failed, the second one worked
        assert mgr.step_locations() == {1: {"local", "durable"}}
        fail.set()
        mgr.save(2, make_state(2, 0, 1))
        with pytest.raises(DrainError, match="after 2 attempts.*simulated outage") as info:
            mgr.wait(durable=True)
        assert isinstance(info.value, ckptio.AsyncSaveError) and info.value.step == 2
        assert mgr.step_locations() == {1: {"local", "durable"}, 2: {"local"}}
        mgr.wait(durable=True)  # raised once
        fail.clear()
    with ckptio.CheckpointManager(root) as plain:
        assert plain.all_steps() == {1: True}  # nothing half-written is visible


def test_a_step_not_yet_durable_restores_from_the_local_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def outage(*args: Any) -> int:
        raise ckptio.StorageError("simulated outage")

    monkeypatch.setattr(tiered, "_upload_one", outage)
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    mgr = TieredCheckpointManager(root, local=local, drain_backoff=60.0)
    mgr.save(1, make_state(1, 0, 1))
    assert mgr.step_locations() == {1: {"local"}}
    state, result = _load(mgr)
    assert check_state(state, 1, 0) is None and result.source == "local"
    t0 = time.monotonic()
    mgr.close(drain=False)  # cuts the 60 s backoff short; the step stays local
    assert time.monotonic() - t0 < 30
    with ckptio.CheckpointManager(root) as plain:
        assert plain.steps() == []
    monkeypatch.undo()
    # the next run copies what the last one left behind
    with TieredCheckpointManager(root, local=local) as mgr:
        mgr.wait(durable=True)
        assert mgr.step_locations() == {1: {"local", "durable"}}


def test_ls_shows_the_tier_of_each_step(tmp_path: Path, gate: threading.Event) -> None:
    from ckptio import cli

    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    gate.set()
    with TieredCheckpointManager(root, local=local, local_retention=ckptio.KeepLatest(2)) as mgr:
        mgr.save(1, make_state(1, 0, 1))
        mgr.save(2, make_state(2, 0, 1))
        mgr.wait(durable=True)
        gate.clear()
        mgr.save(3, make_state(3, 0, 1))
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["ls", root, "--local", local]) == 0
        text = out.getvalue()
        assert "TIER" in text.splitlines()[1]
        rows = {line.split()[0]: line.split()[1] for line in text.splitlines()[2:] if line.strip()}
        assert rows == {"1": "durable", "2": "both", "3": "local"}
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["ls", root, "--local", local, "--json"]) == 0
        doc = json.loads(out.getvalue())
        assert [(e["step"], e["tiers"]) for e in doc["steps"]] == [
            (1, ["durable"]),
            (2, ["local", "durable"]),
            (3, ["local"]),
        ]
        assert doc["latest"] == 3
        gate.set()


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ckptio.OptionError, match="did you mean 'local_retention'"):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), local_retenton=None)
    with pytest.raises(ckptio.OptionError, match="POSIX path"):
        TieredCheckpointManager(str(tmp_path / "d"), local="memory://bucket/local")
    with pytest.raises(ckptio.OptionError, match="one format"):
        TieredCheckpointManager("safetensors+file:///tmp/d", local="native+file:///tmp/l")
    mgr = TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), thread_count=1)
    mgr.close()
    with pytest.raises(ckptio.CheckpointError, match="closed"):
        mgr.save(1, make_state(1, 0, 1))
    with pytest.raises(ckptio.OptionError, match="TieredCheckpointManager"):
        ckptio.CheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"))
    with pytest.raises(ValueError, match="drain_attempts"):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), drain_attempts=0)
