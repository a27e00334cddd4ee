"""Stateful wrappers: model, optimizer (+ scheduler) and RNG state resume bit-exactly."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> block with dropout and LayerNorm -> tied output head."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.embed(tokens)
        return self.lm_head(self.norm(h + self.block(h)))


def _setup(seed: int) -> tuple[TinyLM, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    return model, opt, sched


def _train(model: TinyLM, opt: torch.optim.Optimizer, sched: Any, steps: int) -> list[float]:
    """Steps that consume torch and Python randomness (data, dropout), so RNG state matters."""
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 32, (4, 8))
        if random.random() < 2.0:  # consumes Python's generator
            tokens = tokens.roll(random.randint(0, 3), dims=1)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _state(model: TinyLM, opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
    return {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, opt, sched),
        "rng": ckptio.RNGState(),
        "step": step,
    }


def test_training_resumes_bit_exactly(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    random.seed(1)
    _train(model, opt, sched, 3)
    ckptio.save(_state(model, opt, sched, 3), str(tmp_path / "ck"))
    expected_losses = _train(model, opt, sched, 3)
    expected_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected_lr = sched.get_last_lr()

    model2, opt2, sched2 = _setup(123)  # different init and fresh optimizer/scheduler
    torch.manual_seed(999)
    random.seed(999)
    state = _state(model2, opt2, sched2, 0)
    ckptio.load(state, str(tmp_path / "ck"))
    assert state["step"] == 3
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"].item() == 3
    assert _train(model2, opt2, sched2, 3) == expected_losses
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_params[k]), k
    assert sched2.get_last_lr() == expected_lr


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model, _, _ = _setup(0)
    ckptio.save({"model": ckptio.ModelState(model)}, str(tmp_path / "ck"))
    fresh, _, _ = _setup(5)
    assert fresh.lm_head.weight is fresh.embed.weight
    ckptio.load({"model": ckptio.ModelState(fresh)}, str(tmp_path / "ck"))
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    with torch.no_grad():
        fresh.embed.weight.add_(1.0)
    assert torch.equal(fresh.lm_head.weight, model.embed.weight + 1.0)


def test_model_state_loads_in_place(tmp_path: Path) -> None:
    model, _, _ = _setup(0)
    ckptio.save({"model": ckptio.ModelState(model)}, str(tmp_path / "ck"))
    fresh, _, _ = _setup(1)
    param = fresh.block[0].weight
    ckptio.load({"model": ckptio.ModelState(fresh)}, str(tmp_path / "ck"))
    assert fresh.block[0].weight is param, "parameters must be updated in place"
    assert torch.equal(param, model.block[0].weight)
    assert fresh.calls.item() == model.calls.item()


def test_lr_scheduler_round_trip(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 5)
    ckptio.save({"optim": ckptio.OptimizerState(model, opt, sched)}, str(tmp_path / "ck"))
    model2, opt2, sched2 = _setup(0)
    ckptio.load({"optim": ckptio.OptimizerState(model2, opt2, sched2)}, str(tmp_path / "ck"))
    assert sched2.state_dict() == sched.state_dict()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(7)
    random.seed(7)
    ckptio.save({"rng": ckptio.RNGState()}, str(tmp_path / "ck"))
    expected = (torch.rand(5), random.random())
    torch.manual_seed(0)
    random.seed(0)
    ckptio.load({"rng": ckptio.RNGState()}, str(tmp_path / "ck"))
    got = (torch.rand(5), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_per_rank_plain_value_single_process(tmp_path: Path) -> None:
    ckptio.save({"loader": ckptio.PerRank({"epoch": 2, "offset": 17})}, str(tmp_path / "ck"))
    # dicts are flattened into keys (as DCP does), so the destination mirrors the structure
    holder = ckptio.PerRank({"epoch": 0, "offset": 0})
    ckptio.load({"loader": holder}, str(tmp_path / "ck"))
    assert holder.value == {"epoch": 2, "offset": 17}
    scalar = ckptio.PerRank(None)
    ckptio.save({"seed": ckptio.PerRank(1234)}, str(tmp_path / "ck2"))
    ckptio.load({"seed": scalar}, str(tmp_path / "ck2"))
    assert scalar.value == 1234


@pytest.mark.parametrize("frozen", [True])
def test_model_state_options_ignore_frozen(tmp_path: Path, frozen: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model, _, _ = _setup(0)
    model.norm.requires_grad_(not frozen)
    opts = StateDictOptions(ignore_frozen_params=True)
    ckptio.save({"model": ckptio.ModelState(model, opts)}, str(tmp_path / "ck"))
    stored = set(ckptio.manifest(str(tmp_path / "ck")).format_metadata["dcp"]["state"])
    assert "model.norm.weight" not in stored and "model.block.0.weight" in stored


# -- pipeline parallelism: a list of model parts ---------------------------------------------------
def _pp_model(seed: int) -> nn.ModuleDict:
    """The whole model: torchtitan-style stages are copies holding a subset of its FQNs."""
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"embed": nn.Embedding(32, 8), "l0": nn.Linear(8, 8), "l1": nn.Linear(8, 8), "head": nn.Linear(8, 32)}
    )


def _split(model: nn.ModuleDict, stages: list[list[str]]) -> list[nn.ModuleDict]:
    return [nn.ModuleDict({name: model[name] for name in names}) for names in stages]


def _pp_train(parts: list[nn.ModuleDict], opts: list[torch.optim.Optimizer], scheds: list[Any]) -> None:
    for _ in range(2):
        h = torch.randint(0, 32, (4, 6))
        for part in parts:
            for layer in part.values():
                h = layer(h)
        h.sum().backward()
        for opt, sched in zip(opts, scheds):
            opt.step()
            opt.zero_grad()
            sched.step()


def _pp_state(
    parts: list[nn.ModuleDict], lrs: tuple[float, ...] = (1e-2, 2e-2)
) -> tuple[dict[str, Any], list[torch.optim.Optimizer], list[Any]]:
    opts = [torch.optim.AdamW(p.parameters(), lr=lr) for p, lr in zip(parts, lrs)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    state = {"model": ckptio.ModelState(parts), "optim": ckptio.OptimizerState(parts, opts, scheds)}
    return state, opts, scheds


def test_model_and_optimizer_parts_round_trip(tmp_path: Path) -> None:
    src = _split(_pp_model(0), [["embed", "l0"], ["l1", "head"]])
    state, opts, scheds = _pp_state(src)
    _pp_train(src, opts, scheds)
    ckptio.save(state, str(tmp_path / "ck"))
    stored = set(ckptio.manifest(str(tmp_path / "ck")).format_metadata["dcp"]["state"])
    assert {"model.embed.weight", "model.head.weight"} <= stored  # one merged model entry
    assert "optim.optim.state.l1.weight.exp_avg" in stored  # the optimizer keyed by FQN (flattened)

    dest = _split(_pp_model(1), [["embed", "l0"], ["l1", "head"]])
    dest_state, dest_opts, dest_scheds = _pp_state(dest)
    ckptio.load(dest_state, str(tmp_path / "ck"))
    for a, b in zip(src, dest):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    for a, b in zip(opts, dest_opts):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]  # each part keeps its own lr
        for i, s in sa["state"].items():
            assert all(torch.equal(s[k], sb["state"][i][k]) for k in s)
    assert [s.state_dict() for s in dest_scheds] == [s.state_dict() for s in scheds]


def test_parts_reshard_to_another_split_and_to_one_model(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    src = _split(_pp_model(0), [["embed", "l0"], ["l1", "head"]])
    state, opts, scheds = _pp_state(src, lrs=(1e-2, 1e-2))
    _pp_train(src, opts, scheds)
    ckptio.save(state, str(tmp_path / "ck"))
    expected = {n: t.clone() for p in src for n, t in p.state_dict().items()}
    expected_avg = {
        n: opts[i].state[p]["exp_avg"] for i, part in enumerate(src) for n, p in part.named_parameters()
    }

    three = _split(_pp_model(1), [["embed"], ["l0", "l1"], ["head"]])
    three_state, three_opts, _ = _pp_state(three, lrs=(1e-2, 1e-2, 1e-2))
    ckptio.load(three_state, str(tmp_path / "ck"))
    assert all(torch.equal(t, expected[n]) for p in three for n, t in p.state_dict().items())
    got = {
        n: three_opts[i].state[p]["exp_avg"]
        for i, part in enumerate(three)
        for n, p in part.named_parameters()
    }
    assert got.keys() == expected_avg.keys() and all(torch.equal(got[n], expected_avg[n]) for n in got)

    whole = _pp_model(2)
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-2)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    ckptio.load(
        {"model": ckptio.ModelState(whole), "optim": ckptio.OptimizerState(whole, opt, options=flat)},
        str(tmp_path / "ck"),
        strict=False,  # the single model has one scheduler-less optimizer
    )
    assert all(torch.equal(t, expected[n]) for n, t in whole.state_dict().items())
    assert all(torch.equal(opt.state[p]["exp_avg"], expected_avg[n]) for n, p in whole.named_parameters())


def test_parts_must_hold_distinct_fqns_and_lists_must_match() -> None:
    model = _pp_model(0)
    overlapping = _split(model, [["embed", "l0"], ["l0", "head"]])
    with pytest.raises(ckptio.StateMismatchError, match="l0"):
        ckptio.ModelState(overlapping).state_dict()
    with pytest.raises(TypeError, match="optimizer"):
        parts = _split(model, [["embed"], ["head"]])
        ckptio.OptimizerState(parts, [torch.optim.SGD(parts[0].parameters(), lr=0.1)])
    with pytest.raises(TypeError, match="nn.Module"):
        ckptio.ModelState("model")  # type: ignore[arg-type]


# -- adapter-only model state ----------------------------------------------------------------------
def test_adapters_only_holds_the_trainable_weights_and_loads_strictly(tmp_path: Path) -> None:
    model, _, _ = _setup(0)
    model.requires_grad_(False)
    model.block[3].requires_grad_(True)  # "the adapter": the only trainable part
    ckptio.save({"model": ckptio.ModelState(model, adapters_only=True)}, str(tmp_path / "ck"))
    stored = set(ckptio.manifest(str(tmp_path / "ck")).format_metadata["dcp"]["state"])
    assert stored == {"model.block.3.weight", "model.block.3.bias", "model.calls"}  # + persistent buffers

    fresh, _, _ = _setup(1)
    fresh.requires_grad_(False)
    fresh.block[3].requires_grad_(True)
    frozen_before = fresh.block[0].weight.clone()
    ckptio.load({"model": ckptio.ModelState(fresh, adapters_only=True)}, str(tmp_path / "ck"), strict=True)
    assert torch.equal(fresh.block[3].weight, model.block[3].weight)
    assert torch.equal(fresh.block[0].weight, frozen_before)  # frozen weights untouched
