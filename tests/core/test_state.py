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
