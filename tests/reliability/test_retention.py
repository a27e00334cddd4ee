"""Retention: combined policies keep the union of what each wants, and never the wrong thing.

The newest committed step and the step the run resumed from survive any policy; deletion runs in
a background thread and a failure there is logged, not raised into training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio.retention import StepInfo


def infos(losses: dict[int, float]) -> list[StepInfo]:
    return [StepInfo(s, {"loss": v, "acc": -v}) for s, v in sorted(losses.items())]


LOSSES = {10: 0.9, 20: 0.5, 30: 0.7, 40: 0.2, 50: 0.8, 60: 0.6, 70: 0.95}


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (ckptio.KeepLatest(2), {60, 70}),
        (ckptio.KeepBest(2, "loss"), {40, 20}),
        (ckptio.KeepBest(2, "acc", mode="max"), {40, 20}),
        (ckptio.KeepBest(1, "loss", mode="max"), {70}),
        (ckptio.KeepEvery(20), {20, 40, 60}),
        (ckptio.KeepLatest(1) | ckptio.KeepBest(1, "loss"), {70, 40}),
        (ckptio.KeepLatest(1) | ckptio.KeepBest(1, "loss") | ckptio.KeepEvery(30), {70, 40, 30, 60}),
        (ckptio.KeepBest(3, "missing_metric"), set()),
    ],
)
def test_policy_combinations(policy: ckptio.RetentionPolicy, kept: set[int]) -> None:
    assert policy.keep(infos(LOSSES)) == kept


def test_best_ignores_non_finite_metrics() -> None:
    steps = [
        StepInfo(1, {"loss": float("nan")}),
        StepInfo(2, {"loss": float("inf")}),
        StepInfo(3, {"loss": 1.0}),
    ]
    assert ckptio.KeepBest(2, "loss").keep(steps) == {3}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_policy_arguments(bad: object) -> None:
    with pytest.raises(ValueError):
        ckptio.KeepLatest(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ckptio.KeepEvery(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ckptio.KeepBest(1, "loss", mode="median")


def tiny(step: int) -> dict[str, object]:
    return {"w": torch.full((4,), float(step)), "step": step}


def run_series(
    root: Path, policy: ckptio.RetentionPolicy, losses: dict[int, float], async_save: bool
) -> list[int]:
    with ckptio.CheckpointManager(str(root), retention=policy, async_save=async_save) as mgr:
        for step, loss in sorted(losses.items()):
            mgr.save(step, tiny(step), metrics={"loss": loss})
    # close() waited for the background deleter
    with ckptio.CheckpointManager(str(root)) as mgr:
        return mgr.steps()


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_applies_combined_policy(tmp_path: Path, async_save: bool) -> None:
    policy = ckptio.KeepLatest(2) | ckptio.KeepBest(1, "loss") | ckptio.KeepEvery(30)
    assert run_series(tmp_path, policy, LOSSES, async_save) == [30, 40, 60, 70]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"] + [
        f"step_000000{s}" for s in (30, 40, 60, 70)
    ]


def test_newest_committed_is_never_deleted(tmp_path: Path) -> None:
    # the newest step has the worst loss: KeepBest alone would drop it
    assert run_series(tmp_path, ckptio.KeepBest(1, "loss"), LOSSES, async_save=False) == [40, 70]


def test_resumed_from_step_is_kept(tmp_path: Path) -> None:
    run_series(tmp_path, ckptio.KeepLatest(5), {1: 1.0, 2: 1.0, 3: 1.0}, async_save=False)
    with ckptio.CheckpointManager(str(tmp_path), retention=ckptio.KeepLatest(1)) as mgr:
        dest = tiny(0)
        mgr.load(dest, 2)  # resume from an older step, e.g. after a loss spike
        assert dest["step"] == 2 and mgr.resumed_from == 2
        for step in (4, 5, 6):
            mgr.save(step, tiny(step))
        assert 2 in mgr.protected_steps()
        with pytest.raises(ckptio.CheckpointError, match="protected"):
            mgr.delete(2)
        with pytest.raises(ckptio.CheckpointError, match="protected"):
            mgr.delete(6)
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.steps() == [2, 6]


def test_deletion_failure_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ckptio.CheckpointManager(str(tmp_path), retention=ckptio.KeepLatest(1)) as mgr:
        real_remove = mgr.backend.remove

        def failing_remove(path: str, recursive: bool = False) -> None:
            if "step_00000001" in path and not path.endswith("partial"):
                raise ckptio.StorageError(f"{path}: injected delete failure")
            real_remove(path, recursive)

        mgr.backend.remove = failing_remove  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="ckptio"):
            for step in (1, 2, 3):
                mgr.save(step, tiny(step))  # must not raise
            mgr._deleter.join()  # the queue: wait until the background deleter is idle
        assert mgr.latest_step() == 3
        mgr.backend.remove = real_remove  # type: ignore[method-assign]
    assert any("could not delete" in r.getMessage() and "injected" in r.getMessage() for r in caplog.records)
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        assert 3 in mgr.steps() and 2 not in mgr.steps()
        # step 1 could not be deleted: it is still committed and intact, not half-deleted
        if 1 in mgr.steps():
            dest = tiny(0)
            mgr.load(dest, 1)
            assert torch.equal(dest["w"], torch.full((4,), 1.0))
