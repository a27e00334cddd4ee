"""``ckptio.storage_writer`` / ``ckptio.storage_reader`` under plain ``dcp.save``, ``dcp.async_save``
and ``dcp.load`` (docs/dcp.md).

* A torchtitan-style job on 2 real gloo ranks (FSDP2, model and optimizer through
  ``get_state_dict``) saves synchronously and asynchronously to a path and to ``s3://`` (moto),
  natively and as ``safetensors+s3://``; ``dcp.load`` through the reader on 2 ranks and
  ``ckptio.load`` on 1 get the same values back; ``ckptio verify`` and the CLI accept the result.
  The same job checks that a save failing on either rank publishes nothing, and runs the example
  of docs/dcp.md on its 2 ranks.
* SIGKILL at random moments of a ``dcp.save`` loop: committed steps stay whole and loadable, the
  partial one is invisible.
* Bad input: misspelt options name the right one; unknown schemes give ckptio's error.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckptio.commit import file_token
from torch import nn

from tests.dcp.dcp_crash_child import check_state, fresh_state, make_state, step_url
from tests.e2e._ranks import run_ranks
from tests.reliability.zygote import Zygote

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("dcp_crash_child.py")
DOC = REPO / "docs" / "dcp.md"


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(# test: run\n.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/dcp.md has one runnable example"
    return blocks[0]


# -- the model, torchtitan style ------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(33, 16)  # 33 rows: uneven FSDP shards
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))])
        self.head = nn.Linear(16, 33)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class AppState:
    """What torchtitan checkpoints: model and optimizer state dicts keyed by FQN."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def _model(seed: int, world: int | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    tokens = torch.randint(0, 33, (2, 5), generator=torch.Generator().manual_seed(step))
    nn.functional.cross_entropy(model(tokens).reshape(-1, 33), tokens.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Whole tensors of the model and optimizer (a collective; empty off rank 0 when sharded)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {f"model.{k}": v.clone() for k, v in get_model_state_dict(model, options=opts).items()}
    for fqn, st in get_optimizer_state_dict(model, opt, options=opts).get("state", {}).items():
        for name, v in st.items():
            out[f"optim.{fqn}.{name}"] = torch.as_tensor(v).clone()
    return out


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"app": AppState(model, opt), "step": step, "run": {"name": "tiny", "betas": (0.9, 0.95)}}


def _listing(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


# -- the 2-rank job (top level: spawn pickles it by name) -------------------------------------------
def _job(rank: int, world: int, local: str, s3: str | None, s3_opts: Any, doc_dir: str) -> dict[str, Any]:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    out: dict[str, Any] = {"expected": {}, "loaded": {}, "steps": {}, "times": {}}
    t0 = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t0
        out["times"][name] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()

    ckpt_pg = dist.new_group(backend="gloo")  # torchtitan's own group for asynchronous saves
    model, opt = _model(0, world)
    state = _state(model, opt, 0)
    targets = [(local, None, "")] + ([(s3, s3_opts, "safetensors+")] if s3 else [])
    step = 0
    for root, opts, fmt in targets:
        step += 1
        _train(model, opt, step)
        state["step"] = step
        url = f"{root}/step_{step:08d}"
        dcp.save(state, storage_writer=ckptio.storage_writer(f"{fmt}{url}", storage_options=opts))
        out["expected"][url] = _full(model, opt)

        step += 1
        _train(model, opt, step)
        state["step"] = step
        url = f"{root}/step_{step:08d}"
        # one writer for the series, each save sent to its step by checkpoint_id (DCP's reset)
        writer = ckptio.storage_writer(f"{root}/unused", storage_options=opts, metadata={"step": step})
        fut = dcp.async_save(state, storage_writer=writer, checkpoint_id=url, process_group=ckpt_pg)
        out["expected"][url] = _full(model, opt)  # training collectives while the save runs
        fut.result()
        lap(f"save {root[:2]}")

    for root, opts, _ in targets:
        for url in [u for u in out["expected"] if u.startswith(root)]:
            fresh, fresh_opt = _model(7, world)
            loaded = _state(fresh, fresh_opt, -1)
            reader = ckptio.storage_reader(url, storage_options=opts)
            dcp.load(loaded, storage_reader=reader)
            out["loaded"][url] = _full(fresh, fresh_opt)
            out["steps"][url] = (loaded["step"], loaded["run"])
        lap(f"load {root[:2]}")

    # a save that fails on one rank publishes nothing: on the coordinator it is aborted at once,
    # elsewhere DCP skips finish() and the coordinator's writer drops it at its next use
    for bad_rank in (0, 1):
        url = f"{local}/failed_on_{bad_rank}"
        bad: dict[str, Any] = {"w": torch.ones(4)}
        if rank == bad_rank:
            bad[f"only_on_{rank}"] = object()  # not storable: this rank's write fails
        writer = ckptio.storage_writer(url)
        try:
            dcp.save(bad, storage_writer=writer)
            out[f"failed_{bad_rank}"] = "saved?!"
        except BaseException as exc:  # DCP raises CheckpointException (a BaseException)
            out[f"failed_{bad_rank}"] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
        out[f"after_failure_{bad_rank}"] = [n for n in _listing(local) if "failed" in n]
        writer.close()
        dist.barrier()
        out[f"after_close_{bad_rank}"] = [n for n in _listing(local) if "failed" in n]
    lap("failures")

    # the example of docs/dcp.md, on these 2 ranks
    os.chdir(doc_dir)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    out["doc"] = (namespace["state"]["step"], namespace["latest"])
    lap("doc")
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> dict[str, Any]:
    pytest.importorskip("ckptio_fsspec")
    tmp = tmp_path_factory.mktemp("dcp")
    bucket = s3_server.make_bucket()
    t0 = time.monotonic()
    results = run_ranks(
        _job,
        2,
        args=(str(tmp / "local"), f"s3://{bucket}/run", s3_server.storage_options(), str(tmp)),
        env={"OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    print(f"2-rank dcp job: {time.monotonic() - t0:.1f}s", results[0]["times"])
    return {"tmp": tmp, "bucket": bucket, "opts": s3_server.storage_options(), "ranks": results}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    assert any(k.endswith("exp_avg_sq") for k in expected), "optimizer state is part of it"
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"values differ: {bad}"


def _opts(job: dict[str, Any], url: str) -> dict[str, Any] | None:
    return job["opts"] if url.startswith("s3://") else None


@pytest.mark.multirank
@pytest.mark.servers
@pytest.mark.slow
def test_dcp_saves_load_back_on_two_ranks(job: dict[str, Any]) -> None:
    rank0, rank1 = job["ranks"]
    expected = rank0["expected"]
    assert len(expected) == 4 and rank1["expected"] == {k: {} for k in expected}
    for url, full in expected.items():
        _assert_same(rank0["loaded"][url], full)
        step = int(url.rsplit("_", 1)[1])
        for r in (rank0, rank1):  # non-tensor values come back as saved, tuples included
            assert r["steps"][url] == (step, {"name": "tiny", "betas": (0.9, 0.95)})
    # the async saves' writer went where checkpoint_id said, and wrote nothing at its own URL
    assert not (job["tmp"] / "local" / "unused").exists()
    assert ckptio.manifest(str(job["tmp"] / "local" / "step_00000002")).metadata == {"step": 2}


@pytest.mark.multirank
@pytest.mark.servers
@pytest.mark.slow
def test_dcp_saves_are_committed_ckptio_checkpoints(job: dict[str, Any]) -> None:
    from ckptio import cli

    expected = job["ranks"][0]["expected"]
    formats = {}
    for url in expected:
        opts = _opts(job, url)
        m = ckptio.manifest(url, storage_options=opts)
        formats[url.rsplit("/", 1)[1] + ("@s3" if opts else "")] = m.format
        assert m.world_size == 2
        assert ckptio.verify(url, storage_options=opts) > 0
        if opts:  # marker store: every data file carries the save's token
            tokens = {file_token(name) for name in m.files if not name.endswith(".index.json")}
            assert len(tokens) == 1 and None not in tokens, sorted(m.files)
    assert formats == {
        "step_00000001": "native",
        "step_00000002": "native",
        "step_00000003@s3": "safetensors",
        "step_00000004@s3": "native",
    }
    local = job["tmp"] / "local"
    assert not [n for n in os.listdir(local) if n.startswith(".")], "no staging left behind"
    assert cli.main(["verify", str(local / "step_00000002")]) == 0
    assert cli.main(["ls", str(local), "--json"]) == 0


@pytest.mark.multirank
@pytest.mark.servers
@pytest.mark.slow
def test_ckptio_load_on_one_rank(job: dict[str, Any]) -> None:
    for url, full in job["ranks"][0]["expected"].items():
        model, opt = _model(3, None)
        state = _state(model, opt, -1)
        ckptio.load(state, url, storage_options=_opts(job, url))
        _assert_same(_full(model, opt), full)
        assert state["step"] == int(url.rsplit("_", 1)[1])


@pytest.mark.multirank
@pytest.mark.servers
@pytest.mark.slow
def test_a_save_failing_on_any_rank_publishes_nothing(job: dict[str, Any]) -> None:
    for r in job["ranks"]:
        for bad_rank in (0, 1):
            assert r[f"failed_{bad_rank}"].startswith("CheckpointException"), r[f"failed_{bad_rank}"]
            assert "cannot store the value" in r[f"failed_{bad_rank}"]
    rank0 = job["ranks"][0]
    # the coordinator's own failure aborted at once
    assert rank0["after_failure_0"] == [], rank0["after_failure_0"]
    # another rank's failure: staged, never visible, gone once the writer is closed
    assert all(n.startswith(".failed_on_1.") for n in rank0["after_failure_1"]), rank0["after_failure_1"]
    assert rank0["after_close_1"] == []
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load({"w": torch.zeros(4)}, str(job["tmp"] / "local" / "failed_on_1"))


@pytest.mark.multirank
@pytest.mark.servers
@pytest.mark.slow
def test_doc_example_on_two_ranks(job: dict[str, Any]) -> None:
    for r in job["ranks"]:
        assert r["doc"] == (6, 6)
    runs = job["tmp"] / "runs" / "dcp"
    assert sorted(os.listdir(runs)) == ["step_00000003", "step_00000006"]
    assert ckptio.manifest(str(runs / "step_00000006")).world_size == 2


# -- SIGKILL ---------------------------------------------------------------------------------------
@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Any]:
    made: list[Zygote] = []

    def make(env: dict[str, str] | None = None) -> Zygote:
        made.append(Zygote(CHILD, tmp_path / f"zygote{len(made)}.log", env))
        return made[-1]

    yield make
    for z in made:
        z.close()


def _check_after_kill(root: str, opts: dict[str, Any] | None, saved: list[int]) -> int | None:
    """Every step a save returned for is committed and holds its values; the rest is invisible."""
    with ckptio.CheckpointManager(root, storage_options=opts) as mgr:
        seen = mgr.all_steps()
        for step in seen:  # a load finishes an interrupted replacement of the step first
            try:
                ckptio.load(fresh_state(), str(mgr.url_of(step)), storage_options=opts)
            except ckptio.CheckpointNotFoundError:
                pass
        committed = mgr.steps()
        for step in committed:
            state = fresh_state()
            ckptio.load(state, str(mgr.url_of(step)), storage_options=opts)
            assert check_state(state, step) is None, (step, check_state(state, step))
        if saved:
            assert set(saved) <= set(committed), (saved, committed)
        for step, ok in mgr.all_steps().items():
            if not ok:  # the partial save: no checkpoint there
                with pytest.raises(ckptio.CheckpointNotFoundError):
                    ckptio.load(fresh_state(), str(mgr.url_of(step)), storage_options=opts)
        if committed:
            assert ckptio.verify(str(mgr.url_of(committed[-1])), storage_options=opts) > 0
        return committed[-1] if committed else None


def _kill_loop(
    make: Any,
    root: str,
    tmp: Path,
    kills: int,
    seed: int,
    opts: Any,
    overwrite: bool,
    delay: tuple[float, float],
) -> list[Any]:
    z = make()
    rng = random.Random(seed)
    newest: int | None = None
    history = []
    for i in range(kills):
        progress = tmp / f"progress{i}.txt"
        cfg = {
            "root": root,
            "start": 0 if newest is None else newest + 1,
            "overwrite": overwrite and i % 2 == 1,
            "progress": str(progress),
            "storage_options": opts,
        }
        pid = int(z.send("run " + json.dumps(cfg)).split()[1])
        # once the worker committed a first step, SIGKILL it at a random moment of the next saves
        deadline = time.monotonic() + 60
        while "saved" not in (progress.read_text() if progress.exists() else ""):
            assert time.monotonic() < deadline, f"worker {i} saved nothing; see {z.log.name}"
            time.sleep(0.005)
        time.sleep(rng.uniform(*delay))
        os.kill(pid, signal.SIGKILL)
        status = int(z.send("reap").split()[1])
        assert os.WIFSIGNALED(status), f"worker {i} ended on its own ({status}); see {z.log.name}"
        saved = [
            int(line.split()[1]) for line in progress.read_text().splitlines() if line.startswith("saved")
        ]
        newest = _check_after_kill(root, opts, saved)
        history.append((len(saved), newest))
    return history


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_dcp_save_local(tmp_path: Path, zygote: Any) -> None:
    root = str(tmp_path / "run")
    history = _kill_loop(zygote, root, tmp_path, kills=4, seed=7, opts=None, overwrite=True, delay=(0.0, 0.3))
    print("saves returned / newest committed step after each kill:", history)
    newest = [n for _, n in history]
    assert None not in newest and newest == sorted(set(newest)), history  # each worker added a step
    # A later save of a killed step's URL removes its dead staging directory and lease. (A lease
    # rewrite killed half-way leaves the local backend's ``..<lease>.<hex>.tmp``: hidden, never
    # read, and documented as removable by whoever cleans the directory.)
    leftovers = [n for n in os.listdir(root) if n.startswith(".") and not n.endswith(".tmp")]
    for step in {int(n.split(".")[1].split("_")[1]) for n in leftovers}:
        dcp.save(make_state(step), storage_writer=ckptio.storage_writer(step_url(root, step)))
    assert [n for n in os.listdir(root) if n.startswith(".") and not n.endswith(".tmp")] == []


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(120)
def test_sigkill_during_dcp_save_s3(tmp_path: Path, zygote: Any, s3_server: Any) -> None:
    pytest.importorskip("ckptio_fsspec")
    root = f"s3://{s3_server.make_bucket()}/run"
    opts = s3_server.storage_options()
    history = _kill_loop(
        lambda: zygote(s3_server.env()),
        root,
        tmp_path,
        kills=1,
        seed=11,
        opts=opts,
        overwrite=False,
        delay=(0.0, 0.6),
    )
    print("saves returned / newest committed step after each kill:", history)
    newest = [n for _, n in history]
    assert None not in newest and newest == sorted(set(newest)), history


# -- bad input (one process) ----------------------------------------------------------------------
def test_unknown_options_name_the_closest(tmp_path: Path) -> None:
    url = str(tmp_path / "x")
    with pytest.raises(TypeError, match="did you mean 'overwrite'"):
        ckptio.storage_writer(url, overwrit=False)
    with pytest.raises(ckptio.OptionError, match="did you mean 'thread_count'"):
        ckptio.storage_writer(url, thread_cont=4)
    with pytest.raises(ckptio.OptionError, match="did you mean 'storage_options'"):
        ckptio.storage_writer(url, storage_option={})
    ckptio.save({"w": torch.ones(2)}, url)
    with pytest.raises(ckptio.OptionError, match="did you mean 'verify'"):
        ckptio.storage_reader(url, verfy=False)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "nothing was started"


def test_unknown_scheme_and_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(ckptio.BackendNotFoundError, match="no ckptio backend for nosuch://"):
        ckptio.storage_writer("nosuch://bucket/run")
    with pytest.raises(ckptio.BackendNotFoundError):
        ckptio.storage_reader("nosuch://bucket/run")
    with pytest.raises(ckptio.FormatNotFoundError):
        ckptio.storage_writer(f"nosuchformat+file://{tmp_path}/x")
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.storage_reader(str(tmp_path / "nothing"))
    writer = ckptio.storage_writer(str(tmp_path / "a"))
    with pytest.raises(ckptio.CheckpointError, match="names the 'safetensors' format"):
        dcp.save(
            {"w": torch.ones(2)}, storage_writer=writer, checkpoint_id=f"safetensors+file://{tmp_path}/b"
        )


def test_one_process_save_failure_and_concurrent_replacement(tmp_path: Path) -> None:
    url = str(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BaseException, match="cannot store the value"):
            dcp.save({"w": torch.ones(2), "bad": object()}, storage_writer=ckptio.storage_writer(url))
        assert os.listdir(tmp_path) == [], "the failed save left nothing"
        dcp.save({"w": torch.ones(2), "n": 1}, storage_writer=ckptio.storage_writer(url))
        with pytest.raises(BaseException, match="already holds a committed checkpoint"):
            dcp.save({"w": torch.ones(2)}, storage_writer=ckptio.storage_writer(url, overwrite=False))
        reader = ckptio.storage_reader(url)
        ckptio.save({"w": torch.full((2,), 2.0), "n": 2}, url)  # replaced after the reader read its manifest
        with pytest.raises(BaseException, match="replaced by another save"):
            dcp.load({"w": torch.zeros(2), "n": 0}, storage_reader=reader)
        state = {"w": torch.zeros(2), "n": 0}
        dcp.load(state, storage_reader=ckptio.storage_reader(url, verify=False))
        assert state["n"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
