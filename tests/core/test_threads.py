"""Thread pools sized by the cores per local rank (``ckptio.ext.default_thread_count``), and DCP
save-plan caching, which must never reuse a previous save's storage data (its token)."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import ckptio.checkpoint
import pytest
import torch
from ckptio import _threads
from ckptio.commit import file_token
from ckptio.ext import (
    available_cores,
    default_thread_count,
    local_world_size,
    read_manifest,
    resolve_thread_count,
)
from ckptio.formats.native import (
    MAX_DEFAULT_READ_THREADS,
    MAX_DEFAULT_WRITE_THREADS,
    NativeLoadOptions,
    NativeReader,
)
from ckptio.planner import SafeSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No launcher variables from the outer environment; no cached core count."""
    for var in _threads.LOCAL_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    _threads._reset()
    yield
    _threads._reset()


def _cores(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(_threads, "available_cores", lambda: n)


def test_available_cores_is_the_affinity_mask_capped_by_a_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    n = available_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        _threads._reset()
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
        monkeypatch.setattr(_threads, "_cgroup_quota", lambda: None)
        assert available_cores() == 6
        _threads._reset()
        monkeypatch.setattr(_threads, "_cgroup_quota", lambda: 2.5)  # cpu.max "250000 100000"
        assert available_cores() == 3


def test_default_is_cores_per_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 16)
    assert local_world_size() == 1  # no launcher, no process group
    assert default_thread_count() == 16
    assert default_thread_count(4) == 4  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4
    assert local_world_size() == 4
    assert default_thread_count() == 4
    assert default_thread_count(per_core=2.0) == 8
    assert default_thread_count(2, per_core=2.0) == 2


@pytest.mark.parametrize("var", _threads.LOCAL_SIZE_VARS)
def test_other_launchers(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    _cores(monkeypatch, 8)
    monkeypatch.setenv(var, "2")
    assert local_world_size() == 2
    assert default_thread_count() == 4


@pytest.mark.parametrize("value", ["", "0", "-3", "two", "2(x3)"])
def test_unusable_launcher_values_are_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    assert local_world_size() == 1


def test_at_least_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # 16 ranks on 2 cores
    assert default_thread_count() == 1
    assert default_thread_count(8, per_core=2.0) == 1
    assert default_thread_count(0) == 1
    assert resolve_thread_count(None) == 1
    assert resolve_thread_count(0) == 1
    assert resolve_thread_count(-5) == 1


def test_the_option_overrides_the_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert resolve_thread_count(6) == 6  # the user's thread_count, beyond the cores and the cap
    assert resolve_thread_count(6, 2) == 6
    assert resolve_thread_count(None, 2, per_core=2.0) == 1


def test_native_reader_and_writer_use_the_sizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 cores per rank
    state = {f"t{i}": torch.full((64,), float(i)) for i in range(12)}
    auto = str(tmp_path / "auto")
    ckptio.save(state, auto)
    backend, manifest = _manifest(auto)
    bins = [n for n in manifest.files if n.endswith(".bin")]
    assert len(bins) == MAX_DEFAULT_WRITE_THREADS  # one file per writer thread
    ckptio.save(state, str(tmp_path / "one"), thread_count=1)
    assert [n for n in _manifest(str(tmp_path / "one"))[1].files if n.endswith(".bin")] == ["__0_0.bin"]

    assert NativeReader(backend, auto, manifest).thread_count == min(MAX_DEFAULT_READ_THREADS, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # one core per rank: two readers
    assert NativeReader(backend, auto, manifest).thread_count == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert NativeReader(backend, auto, manifest).thread_count == 1
    assert NativeReader(backend, auto, manifest, NativeLoadOptions(thread_count=3)).thread_count == 3

    dest = {k: torch.zeros(64) for k in state}
    ckptio.load(dest, str(tmp_path / "auto"))  # 1 reader thread
    assert all(torch.equal(dest[k], state[k]) for k in state)


def _manifest(url: str) -> tuple[Any, Any]:
    u, backend = ckptio.checkpoint.open_backend(url)
    manifest = read_manifest(backend, u.path)
    assert manifest is not None
    return backend, manifest


def test_safetensors_format_uses_the_sizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ckptio_safetensors")
    from ckptio_safetensors.format import SafetensorsLoadOptions, SafetensorsSaveOptions

    assert SafetensorsSaveOptions().thread_count is None
    assert SafetensorsLoadOptions().thread_count is None
    _cores(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    url = f"safetensors+file://{tmp_path / 'st'}"
    ckptio.save(state, url)
    dest = {"w": torch.zeros(1000)}
    ckptio.load(dest, url)
    assert torch.equal(dest["w"], state["w"])


# -- learning the local world size from the process group ------------------------------------
def _learn_body(rank: int, world_size: int) -> list[int]:
    """Rank ``r`` pretends to run on host ``r // 2``: two ranks per host."""
    import socket

    import torch.distributed as dist

    for var in _threads.LOCAL_SIZE_VARS:
        os.environ.pop(var, None)
    socket.gethostname = lambda: f"host{rank // 2}"  # type: ignore[assignment]
    _threads._reset()
    first = local_world_size()  # registers; the others may not have yet
    dist.barrier()
    learned = [local_world_size(), local_world_size()]
    return [first, *learned]


def test_local_world_size_learned_from_the_process_group() -> None:
    from tests.e2e._ranks import run_ranks

    results = run_ranks(_learn_body, 4, timeout=120)
    for first, *learned in results:
        assert first in (2, 4)  # 4 (every rank assumed local) until all have registered
        assert learned == [2, 2]


def test_a_one_rank_group_is_one_local_rank(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert local_world_size() == 1
    finally:
        dist.destroy_process_group()


# -- save-plan caching ---------------------------------------------------------------------------
def _clear_plan_caches() -> None:
    for name in (
        "_cached_save_plan",
        "_cached_final_save_plan",
        "_cached_all_plans",
        "_cached_global_plan",
        "_cached_metadata",
    ):
        getattr(SavePlanner, name).clear()


@pytest.fixture
def cached_plans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Saves plan with DCP's plan caching on; yields whether each save's final plan came from the
    cache (DCP then hands the rank an empty, unusable plan)."""
    reused: list[bool] = []
    original = SafeSavePlanner.finish_plan

    def finish_plan(self: SafeSavePlanner, new_plan: SavePlan) -> SavePlan:
        reused.append(not new_plan.usable)
        return original(self, new_plan)

    _clear_plan_caches()
    monkeypatch.setattr(SafeSavePlanner, "finish_plan", finish_plan)
    monkeypatch.setattr(
        ckptio.checkpoint, "SafeSavePlanner", functools.partial(SafeSavePlanner, enable_plan_caching=True)
    )
    yield reused
    _clear_plan_caches()


def test_cached_plans_never_reuse_a_token(cached_plans: list[bool]) -> None:
    pytest.importorskip("ckptio_fsspec")
    state = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(16), "step": 1}
    url = f"memory://ckptio-plan-cache-{os.getpid()}/run"
    tokens: list[set[str | None]] = []
    for _ in range(3):  # the same URL each time: marker stores write in place
        state["w"] += 1
        ckptio.save(state, url)
        backend, manifest = _manifest(url)
        u = ckptio.checkpoint.open_backend(url)[0]
        data_files = [n for n in manifest.files if n.endswith(".bin")]
        tokens.append({file_token(n) for n in data_files})
        for name in data_files:
            assert backend.exists(backend.join(u.path, name))
        dest = {"w": torch.zeros(4096), "b": torch.zeros(16), "step": 0}
        ckptio.load(dest, url)
        assert torch.equal(dest["w"], state["w"]) and torch.equal(dest["b"], state["b"])
        assert dest["step"] == 1
    assert cached_plans == [False, True, True]  # the second and third saves reused the cached plan
    assert all(len(t) == 1 and None not in t for t in tokens)  # one token per save, in every name
    assert len(set.union(*tokens)) == 3  # never the previous save's


def test_cached_plans_keep_the_file_prefix(tmp_path: Path, cached_plans: list[bool]) -> None:
    state = {"w": torch.arange(64, dtype=torch.float32)}
    for i in range(2):
        ckptio.save(state, str(tmp_path / f"step_{i}"))
        dest = {"w": torch.zeros(64)}
        ckptio.load(dest, str(tmp_path / f"step_{i}"))
        assert torch.equal(dest["w"], state["w"])
    assert cached_plans == [False, True]


def test_finish_plan_takes_this_saves_storage_data() -> None:
    planner: Any = SafeSavePlanner(enable_plan_caching=True)
    cached = SavePlan([], storage_data="__0@old")
    SavePlanner._cached_final_save_plan[planner._cached_plans_key] = cached
    try:
        plan = planner.finish_plan(dataclasses.replace(SavePlan([], usable=False), storage_data="__0@new"))
    finally:
        _clear_plan_caches()
    assert plan.storage_data == "__0@new"
