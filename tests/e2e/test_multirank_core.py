"""The core across real ranks: FSDP2 and DTensor state saved by N ranks and loaded by M.

Three spawned jobs (2 ranks save, 1 rank loads and saves, 2 ranks load) plus loads in this very
process without any process group. Everything runs on CPU with gloo. The ranks send back full
(gathered) tensors and the comparisons happen here, so a failure shows which key differs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from torch import nn

from tests.e2e._ranks import run_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

VOCAB, DIM = 33, 16  # 33 rows: uneven FSDP shards (17 + 16)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def _model(seed: int, world: int | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model (FSDP2-sharded over ``world`` ranks when given) with its AdamW."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) model and optimizer tensors on this rank (empty off rank 0 when sharded)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    out = {f"model.{k}": v.clone() for k, v in msd.items()}
    for fqn, st in osd.get("state", {}).items():
        for name, v in st.items():
            out[f"optim.{fqn}.{name}"] = torch.as_tensor(v).clone()
    return out


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(got) == sorted(expected)
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"values differ: {bad}"
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in expected)


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int, loader: dict[str, int]) -> dict[str, Any]:
    return {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, opt),
        "step": step,
        "rng": ckptio.RNGState(),
        "loader": ckptio.PerRank(loader),
    }


def _grid(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
    return torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) * scale


def _dtensor(full: torch.Tensor, world: int, dim: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(full, init_device_mesh("cpu", (world,)), [Shard(dim)])


# -- rank bodies (top level: spawn pickles them by name) ---------------------------------------
def _save_two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    model, opt = _model(0, world)
    _train(model, opt, 2)
    torch.manual_seed(100 + rank)  # per-rank RNG streams
    ckptio.save(_state(model, opt, 2, {"pos": 10 * rank}), f"{root}/fsdp2")
    after_save = torch.rand(4)  # what the restored RNG must draw again
    dt = {"s0": _dtensor(_grid(7, 6), world, 0), "s1": _dtensor(_grid(5, 9, 0.5), world, 1), "n": 7}
    ckptio.save(dt, f"{root}/dt2")

    # per-rank plain values are refused, not silently deduplicated to rank 0's copy
    errors = []
    try:
        ckptio.save({"same": torch.ones(3), "x": torch.full((2,), float(rank)), "seed": rank}, f"{root}/bad")
    except ckptio.CheckpointError as exc:
        errors.append(str(exc))
    # ...and wrapped in PerRank they are stored once per rank
    ckptio.save(
        {"x": ckptio.PerRank(torch.full((2,), float(rank))), "seed": ckptio.PerRank(rank)}, f"{root}/good"
    )
    return {"full": _full(model, opt), "rng_draw": after_save, "errors": errors}


def _one_rank_group(rank: int, world: int, root: str) -> dict[str, Any]:
    """World size 1 *with* a process group: load the 2-rank checkpoints, then save our own."""
    model, opt = _model(7, world)
    res = ckptio.load(_state(model, opt, -1, {"pos": -1}), f"{root}/fsdp2")
    loaded = _full(model, opt)
    dest = {"s0": _dtensor(torch.zeros(7, 6), world, 1), "s1": _dtensor(torch.zeros(5, 9), world, 0), "n": 0}
    ckptio.load(dest, f"{root}/dt2")
    dt_full = {k: dest[k].full_tensor() for k in ("s0", "s1")}

    _train(model, opt, 1, start=2)
    ckptio.save(
        {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt)}, f"{root}/fsdp1"
    )
    ckptio.save({"t": _dtensor(_grid(9, 4, 2.0), world, 0), "plain": _grid(3, 3)}, f"{root}/dt1")
    return {"loaded": loaded, "unexpected": res.unexpected, "dt": dt_full, "saved": _full(model, opt)}


def _load_two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 2 ranks -> 2 ranks, strict: every key has a destination, per-rank values come back per rank
    model, opt = _model(3, world)
    torch.manual_seed(999)
    loader = ckptio.PerRank({"pos": -1})
    state = _state(model, opt, -1, {})
    state["loader"] = loader
    ckptio.load(state, f"{root}/fsdp2")
    out["fsdp2"] = _full(model, opt)
    out["step"], out["loader"], out["rng_draw"] = state["step"], loader.value, torch.rand(4)

    # 1 rank -> 2 ranks
    model1, opt1 = _model(4, world)
    ckptio.load(
        {"model": ckptio.ModelState(model1), "optim": ckptio.OptimizerState(model1, opt1)}, f"{root}/fsdp1"
    )
    out["fsdp1"] = _full(model1, opt1)

    # DTensor resharding: saved Shard(0)/Shard(1), loaded as Shard(1)/Shard(0)
    dest = {"s0": _dtensor(torch.zeros(7, 6), world, 1), "s1": _dtensor(torch.zeros(5, 9), world, 0), "n": 0}
    ckptio.load(dest, f"{root}/dt2")
    out["dt2"] = {k: dest[k].full_tensor() for k in ("s0", "s1")} | {"n": dest["n"]}
    dest1 = {"t": _dtensor(torch.zeros(9, 4), world, 1), "plain": torch.zeros(3, 3)}
    ckptio.load(dest1, f"{root}/dt1")
    out["dt1"] = {"t": dest1["t"].full_tensor(), "plain": dest1["plain"]}

    good = {"x": ckptio.PerRank(torch.zeros(2)), "seed": ckptio.PerRank(None)}
    ckptio.load(good, f"{root}/good")
    out["good"] = (good["x"].value, good["seed"].value)

    # a manager over 2 ranks, synchronous then asynchronous
    for mode, async_save in (("sync", False), ("async", True)):
        with ckptio.CheckpointManager(
            f"{root}/series-{mode}", async_save=async_save, retention=ckptio.KeepLatest(2)
        ) as mgr:
            for step in (3, 4, 5):
                _train(model, opt, 1, start=step)
                mgr.save(step, _state(model, opt, step, {"pos": step * 100 + rank}))
            mgr.wait()
            expected = _full(model, opt)
            fresh, fresh_opt = _model(11, world)
            resumed = ckptio.PerRank({"pos": -1})
            st = _state(fresh, fresh_opt, -1, {})
            st["loader"] = resumed
            mgr.load(st)
            got = _full(fresh, fresh_opt)  # a collective: every rank must call it
            out[f"mgr-{mode}"] = {
                "steps": mgr.steps(),
                "latest": mgr.latest_step(),
                "step": st["step"],
                "pos": resumed.value["pos"],
                "equal": sorted(got) == sorted(expected)
                and all(torch.equal(v, expected[k]) for k, v in got.items()),
            }
    return out


# -- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multirank")


@pytest.fixture(scope="module")
def saved(root: Path) -> list[dict[str, Any]]:
    return run_ranks(_save_two_ranks, 2, args=(str(root),))


@pytest.fixture(scope="module")
def one_rank(root: Path, saved: list[dict[str, Any]]) -> dict[str, Any]:
    return run_ranks(_one_rank_group, 1, args=(str(root),))[0]


def test_two_rank_save_layout(root: Path, saved: list[dict[str, Any]]) -> None:
    m = ckptio.manifest(str(root / "fsdp2"))
    assert m.world_size == 2
    assert {"__0_0.bin", "__1_0.bin"} <= set(m.files), "each rank wrote its own shard"
    assert ckptio.verify(str(root / "fsdp2")) > 0
    assert saved[1]["full"] == {}, "full state is gathered on rank 0 only"
    assert sorted(p for p in os.listdir(root) if p.startswith(".")) == [], "no staging left behind"


def test_differing_plain_values_are_refused_on_every_rank(root: Path, saved: list[dict[str, Any]]) -> None:
    for rank in (0, 1):
        (msg,) = saved[rank]["errors"]
        assert "differ across ranks" in msg and "ckptio.PerRank" in msg, msg
        assert "x" in msg and "seed" in msg and "same" not in msg.split(":")[1].split(".")[0]
    assert not (root / "bad" / "manifest.json").exists()


def test_load_two_rank_checkpoint_without_process_group(root: Path, saved: list[dict[str, Any]]) -> None:
    model, opt = _model(5, None)
    loader = ckptio.PerRank({"pos": -1})
    state = _state(model, opt, -1, {})
    state["loader"] = loader
    # strict: rank 1's per-rank entries (rng, loader) belong to a rank that is gone, not to this state
    res = ckptio.load(state, str(root / "fsdp2"))
    assert res.unexpected == [] and res.missing == []
    _assert_same(_full(model, opt), saved[0]["full"])
    assert state["step"] == 2 and loader.value == {"pos": 0}
    assert torch.equal(torch.rand(4), saved[0]["rng_draw"]), "rank 0's RNG stream resumes"

    dest = {"s0": torch.zeros(7, 6), "s1": torch.zeros(5, 9), "n": 0}
    ckptio.load(dest, str(root / "dt2"))
    assert torch.equal(dest["s0"], _grid(7, 6)) and torch.equal(dest["s1"], _grid(5, 9, 0.5))
    assert dest["n"] == 7


def test_load_two_rank_checkpoint_with_one_rank_group(
    one_rank: dict[str, Any], saved: list[dict[str, Any]]
) -> None:
    _assert_same(one_rank["loaded"], saved[0]["full"])
    assert one_rank["unexpected"] == []
    assert torch.equal(one_rank["dt"]["s0"], _grid(7, 6)) and torch.equal(
        one_rank["dt"]["s1"], _grid(5, 9, 0.5)
    )


def test_two_rank_loads(root: Path, saved: list[dict[str, Any]], one_rank: dict[str, Any]) -> None:
    out = run_ranks(_load_two_ranks, 2, args=(str(root),))
    _assert_same(out[0]["fsdp2"], saved[0]["full"])
    _assert_same(out[0]["fsdp1"], one_rank["saved"])
    for rank in (0, 1):
        got = out[rank]
        assert got["step"] == 2 and got["loader"] == {"pos": 10 * rank}
        assert torch.equal(got["rng_draw"], saved[rank]["rng_draw"]), f"rank {rank}'s RNG stream"
        assert torch.equal(got["dt2"]["s0"], _grid(7, 6)) and torch.equal(got["dt2"]["s1"], _grid(5, 9, 0.5))
        assert got["dt2"]["n"] == 7
        assert torch.equal(got["dt1"]["t"], _grid(9, 4, 2.0)) and torch.equal(
            got["dt1"]["plain"], _grid(3, 3)
        )
        assert torch.equal(got["good"][0], torch.full((2,), float(rank))) and got["good"][1] == rank
        for mode in ("sync", "async"):
            mgr = got[f"mgr-{mode}"]
            assert mgr["steps"] == [4, 5] and mgr["latest"] == 5 and mgr["step"] == 5, (mode, mgr)
            assert mgr["pos"] == 500 + rank and mgr["equal"], (mode, mgr)
