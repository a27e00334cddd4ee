"""Asynchronous saves: a consistent snapshot, reused staging buffers, background failures surfaced.

``CheckpointManager(async_save=True).save()`` returns once the state is copied into host buffers;
these tests check that what is written is the state as it was at that moment, that the buffers
are the same memory from one save to the next, and that a failure in the background is raised as
:class:`ckptio.AsyncSaveError` by the next ``save``, ``wait`` or ``close``, never lost.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch


def big_state(value: float) -> dict[str, Any]:
    # large enough that the background write is still running when the test mutates the tensors
    return {
        "model": {f"w{i}": torch.full((512, 1024), value) for i in range(8)},
        "ids": torch.full((1000,), int(value), dtype=torch.int64),
        "step": int(value),
    }


def assert_holds(mgr: ckptio.CheckpointManager, step: int, value: float) -> None:
    dest = big_state(-7.0)
    mgr.load(dest, step)
    assert dest["step"] == int(value)
    assert all(torch.equal(t, torch.full_like(t, value)) for t in dest["model"].values())
    assert torch.equal(dest["ids"], torch.full((1000,), int(value), dtype=torch.int64))


def test_mutation_after_save_returns_does_not_leak(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path), async_save=True, max_in_flight=2) as mgr:
        state = big_state(1.0)
        for step in range(1, 5):
            for t in state["model"].values():
                t.fill_(float(step))
            state["ids"].fill_(step)
            state["step"] = step
            assert mgr.save(step, state) is None
            # training goes on at once: every tensor and plain value changes under the write
            for t in state["model"].values():
                t.fill_(-1.0)
            state["ids"].fill_(-1)
            state["step"] = -1
        mgr.wait()
        for step in range(1, 5):
            assert_holds(mgr, step, float(step))


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path), async_save=True, max_in_flight=1) as mgr:
        state = big_state(1.0)
        ptrs = []
        for step in range(3):
            mgr.save(step, state)
            buffers = mgr._stagers[0]._buffers  # the single slot's host buffers
            ptrs.append({k: b.data_ptr() for k, b in buffers.items()})
            mgr.wait()
        assert len(ptrs[0]) == 9
        assert ptrs[0] == ptrs[1] == ptrs[2], "staging buffers were reallocated between saves"
        # the buffers are not the user's tensors (otherwise mutation would leak)
        assert state["model"]["w0"].data_ptr() not in ptrs[0].values()


class FailingAddon:
    """Raises in one hook, once, from the background thread."""

    name = "failing"

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.armed = threading.Event()

    def _maybe_fail(self, where: str) -> None:
        if where == self.hook and self.armed.is_set():
            self.armed.clear()
            raise RuntimeError(f"injected failure in {where}")

    def on_tensors_written(self, ctx: Any) -> None:
        self._maybe_fail("on_tensors_written")

    def after_commit(self, ctx: Any) -> None:
        self._maybe_fail("after_commit")


@pytest.mark.parametrize("hook", ["on_tensors_written", "after_commit"])
@pytest.mark.parametrize("surfaced_by", ["save", "wait", "close"])
def test_background_failure_is_raised_once(tmp_path: Path, hook: str, surfaced_by: str) -> None:
    addon = FailingAddon(hook)
    mgr = ckptio.CheckpointManager(str(tmp_path), async_save=True, addons=[addon])
    state = big_state(1.0)
    mgr.save(1, state)
    mgr.wait()
    addon.armed.set()
    mgr.save(2, big_state(2.0))
    # the failure lands in the background; it must come out of the very next call
    with pytest.raises(ckptio.AsyncSaveError, match="step 2") as info:
        if surfaced_by == "save":
            mgr._in_flight[-1][1].exception()  # let it fail first, so the next save must see it
            mgr.save(3, big_state(3.0))
        elif surfaced_by == "wait":
            mgr.wait()
        else:
            mgr.close()
    assert "injected failure" in str(info.value)
    if surfaced_by != "close":
        mgr.wait()  # reported once, not again
        mgr.close()
    with ckptio.CheckpointManager(str(tmp_path)) as check:
        steps = check.steps()
        assert 1 in steps
        # a failure before the commit leaves nothing visible; after it the data is there
        assert (2 in steps) == (hook == "after_commit")
        assert check.latest_step() == max(steps)
        assert_holds(check, check.latest_step(), float(check.latest_step()))


def test_unwritable_root_fails_at_the_first_save(tmp_path: Path) -> None:
    # /dev/null is a file, so nothing can be created under it, whoever runs the test (even root).
    # The run lock is taken before staging, so even an async save says so at once.
    with ckptio.CheckpointManager("/dev/null/ckptio-test", async_save=True) as mgr:
        with pytest.raises(ckptio.StorageError, match="ckptio-lock"):
            mgr.save(1, big_state(1.0))
        mgr.wait()


def test_unwritable_step_fails_in_background(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path), async_save=True) as mgr:
        mgr.save(1, big_state(1.0))
        mgr.wait()
        real = mgr.backend.open_write

        def full_disk(path: str):  # type: ignore[no-untyped-def]
            if "step_00000002" in path:
                raise ckptio.StorageError(f"{path}: no space left on device")
            return real(path)

        mgr.backend.open_write = full_disk  # type: ignore[method-assign]
        assert mgr.save(2, big_state(2.0)) is None  # staging succeeds; the write fails later
        with pytest.raises(ckptio.AsyncSaveError, match="step 2"):
            mgr.wait()
        mgr.wait()  # raised once
        assert mgr.steps() == [1]


def test_sync_and_async_write_the_same_bytes(tmp_path: Path) -> None:
    state = big_state(5.0)
    with ckptio.CheckpointManager(str(tmp_path / "s")) as sync_mgr:
        sync_mgr.save(5, state)
    with ckptio.CheckpointManager(str(tmp_path / "a"), async_save=True) as async_mgr:
        async_mgr.save(5, state)
    a = ckptio.manifest(str(tmp_path / "s" / "step_00000005"))
    b = ckptio.manifest(str(tmp_path / "a" / "step_00000005"))
    assert a.format_metadata["storage"] == b.format_metadata["storage"]
