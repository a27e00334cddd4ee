"""CheckpointManager: step discovery, ``latest``, loads, retention, async saves, lifecycle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.manager import LATEST_NAME, step_name


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((16,), float(v)), "step": int(v)}


def _load(mgr: ckptio.CheckpointManager, step: int | str = "latest") -> dict[str, Any]:
    dest: dict[str, Any] = {"w": torch.zeros(16), "step": -1}
    mgr.load(dest, step)
    return dest


def test_steps_latest_and_loads(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.steps() == [] and mgr.latest_step() is None
        with pytest.raises(ckptio.CheckpointNotFoundError, match="no committed checkpoint"):
            _load(mgr)
        for step in (10, 20, 30):
            res = mgr.save(step, _state(step), metrics={"loss": 1.0 / step})
            assert res is not None and res.step == step
        assert mgr.steps() == [10, 20, 30] and mgr.latest_step() == 30
        assert (tmp_path / LATEST_NAME).read_text() == "step_00000030\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".ckptio-lock",  # the run lock, held while this manager writes
            LATEST_NAME,
            "step_00000010",
            "step_00000020",
            "step_00000030",
        ]
        assert _load(mgr)["step"] == 30 and mgr.resumed_from == 30
        got = _load(mgr, 20)
        assert got["step"] == 20 and torch.equal(got["w"], torch.full((16,), 20.0))
        with pytest.raises(ckptio.CheckpointNotFoundError, match=r"no step 25 .*committed: \[10, 20, 30\]"):
            _load(mgr, 25)
        m = ckptio.manifest(str(mgr.url_of(20)))
        assert m.step == 20 and m.metrics == {"loss": 1.0 / 20}


def test_a_new_manager_finds_the_series(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    with ckptio.CheckpointManager(f"file://{tmp_path}") as mgr:
        assert mgr.latest_step() == 2 and _load(mgr)["step"] == 2


def test_latest_pointer_is_only_a_hint(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        (tmp_path / LATEST_NAME).write_text("step_00000001\n")  # stale: a newer step is committed
        assert mgr.latest_step() == 2
        (tmp_path / LATEST_NAME).write_text("../../etc/passwd")
        assert mgr.latest_step() == 2
        (tmp_path / LATEST_NAME).unlink()
        assert mgr.latest_step() == 2


def test_uncommitted_steps_do_not_exist(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        (tmp_path / step_name(2) / "manifest.json").unlink()  # as if the commit never happened
        (tmp_path / f".{step_name(3)}.ckptio-partial").mkdir()  # an interrupted save
        assert mgr.steps() == [1] and mgr.latest_step() == 1
        assert mgr.all_steps() == {1: True, 2: False, 3: False}
        with pytest.raises(ckptio.IncompleteCheckpointError, match="never committed"):
            _load(mgr, 2)
        assert _load(mgr)["step"] == 1
        mgr.save(4, _state(4))  # the next save removes leftovers (their owners are gone)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".ckptio-lock",
            LATEST_NAME,
            step_name(1),
            step_name(4),
        ]


def test_retention_keep_latest_and_best(tmp_path: Path) -> None:
    policy = ckptio.KeepLatest(2) | ckptio.KeepBest(1, "loss")
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.2}
    with ckptio.CheckpointManager(str(tmp_path), retention=policy) as mgr:
        for step, loss in losses.items():
            mgr.save(step, _state(step), metrics={"loss": loss})
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.steps() == [2, 4, 5]
    assert not (tmp_path / step_name(1)).exists() and not (tmp_path / step_name(3)).exists()


def test_retention_never_deletes_the_resumed_step_and_delete_protects(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    with ckptio.CheckpointManager(str(tmp_path), retention=ckptio.KeepLatest(1)) as mgr:
        _load(mgr, 1)
        mgr.save(3, _state(3))
        mgr.save(4, _state(4))
        with pytest.raises(ckptio.CheckpointError, match="protected"):
            mgr.delete(4)
        mgr.delete(4, force=True)
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        # 2 and 3 fell to KeepLatest(1); 1 was resumed from; 4 was deleted by hand
        assert mgr.steps() == [1]
        assert mgr.latest_step() == 1, "a pointer to a deleted step is ignored"


def test_retention_policy_validation() -> None:
    with pytest.raises(ValueError):
        ckptio.KeepLatest(0)
    with pytest.raises(ValueError):
        ckptio.KeepBest(1, "loss", mode="median")
    with pytest.raises(ValueError):
        ckptio.CheckpointManager("/tmp/x", max_in_flight=0)


def test_async_save_snapshots_the_state(tmp_path: Path) -> None:
    mgr = ckptio.CheckpointManager(str(tmp_path), async_save=True, retention=ckptio.KeepLatest(2))
    w = torch.zeros(16)
    for step in range(1, 5):
        w.fill_(step)
        assert mgr.save(step, {"w": w, "step": step}) is None
        w.fill_(-1.0)  # training moves on right away: the staged copy must not change
    mgr.wait()
    assert mgr.last_result is not None and mgr.last_result.step == 4
    mgr.close()
    with pytest.raises(ckptio.CheckpointError, match="closed"):
        mgr.save(5, _state(5))
    with ckptio.CheckpointManager(str(tmp_path)) as check:
        assert check.steps() == [3, 4]
        assert torch.equal(_load(check)["w"], torch.full((16,), 4.0))
        assert torch.equal(_load(check, 3)["w"], torch.full((16,), 3.0))


class _FailOnStep:
    def __init__(self, step: int) -> None:
        self.step = step
        self.threads: list[str] = []

    def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
        self.threads.append(threading.current_thread().name)
        if ctx.step == self.step:
            raise RuntimeError(f"disk on fire at step {ctx.step}")


def test_async_failure_is_raised_on_the_next_call(tmp_path: Path) -> None:
    addon = _FailOnStep(2)
    mgr = ckptio.CheckpointManager(str(tmp_path), async_save=True, addons=[addon])
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    with pytest.raises(ckptio.AsyncSaveError, match="step 2.*disk on fire"):
        mgr.wait()
    assert all(name.startswith("ckptio-async") for name in addon.threads), addon.threads
    mgr.save(3, _state(3))
    mgr.close()
    with ckptio.CheckpointManager(str(tmp_path)) as check:
        assert check.steps() == [1, 3]


def test_async_failure_is_raised_by_close_and_context_manager(tmp_path: Path) -> None:
    mgr = ckptio.CheckpointManager(str(tmp_path), async_save=True, addons=[_FailOnStep(1)])
    mgr.save(1, _state(1))
    with pytest.raises(ckptio.AsyncSaveError):
        mgr.close()
    with pytest.raises(ckptio.AsyncSaveError):
        with ckptio.CheckpointManager(str(tmp_path / "b"), async_save=True, addons=[_FailOnStep(1)]) as m2:
            m2.save(1, _state(1))
    # an error inside the block wins over the background one
    with pytest.raises(KeyError):
        with ckptio.CheckpointManager(str(tmp_path / "c"), async_save=True, addons=[_FailOnStep(1)]) as m3:
            m3.save(1, _state(1))
            raise KeyError("user code failed")


def test_load_waits_for_background_saves(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path), async_save=True, max_in_flight=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        assert _load(mgr)["step"] == 3
        assert mgr.steps() == [1, 2, 3]


def test_invalid_steps(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError):
                mgr.save(bad, _state(0))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            mgr.load({}, step="newest")
