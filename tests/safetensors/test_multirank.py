"""Two FSDP2 ranks save with the safetensors format; the files stand alone, reshard to 1 and 2
ranks, and consolidate into a directory that transformers loads with identical logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ckptio
import pytest
import torch
from safetensors.torch import load_file

from tests.e2e._ranks import run_ranks

from ._models import build_llama, fsdp_save_and_reload, input_ids, tiny_llama_config

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("fsdp2")
    results = run_ranks(fsdp_save_and_reload, 2, args=(str(root),))
    return root, results


def test_two_ranks_reload_into_two_ranks(saved: tuple[Path, list[dict]]) -> None:
    _, results = saved
    assert results[0]["equal"], "2-rank load did not restore the 2-rank save"
    assert results[0]["same_after_step"], "optimizer state did not round-trip"
    assert [r["step"] for r in results] == [1, 1]


def test_every_file_is_plain_safetensors_and_every_shard_is_there(saved: tuple[Path, list[dict]]) -> None:
    root, _ = saved
    ck = root / "ck"
    ref = torch.load(root / "ref.pt")
    model_files = sorted((ck / "model").glob("*.safetensors"))
    assert {f.name.split("-")[0] for f in model_files} == {"rank00000", "rank00001"}
    # no HF index: the model's tensors are split across the ranks' files
    assert not (ck / "model" / "model.safetensors.index.json").exists()
    rows: dict[str, int] = {}
    for f in sorted(ck.rglob("*.safetensors")):
        tensors = load_file(str(f))  # each file on its own, with nothing but safetensors
        assert tensors
        if f.parent.name == "model":
            for name, t in tensors.items():
                rows[name] = rows.get(name, 0) + t.shape[0]
    # both ranks' shards landed on disk: the row counts add up to the full tensors
    assert rows == {k: v.shape[0] for k, v in ref.items()}
    values = json.loads((ck / "values-rank00000.json").read_text())
    assert values["step"] == 1 and values["optim.optim.param_groups.0.lr"] == 0.01
    assert not (ck / "values-rank00001.json").exists()  # replicated values are written once
    assert ckptio.verify(str(ck)) > 0


def test_load_into_one_rank(saved: tuple[Path, list[dict]]) -> None:
    root, _ = saved
    ref = torch.load(root / "ref.pt")
    model = build_llama(5, shard=False)
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(root / "ck"), strict=False)
    assert "step" in result.unexpected
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_consolidated_loads_in_transformers(saved: tuple[Path, list[dict]], tmp_path: Path) -> None:
    import ckptio_safetensors
    from transformers import AutoModelForCausalLM

    root, _ = saved
    ref = torch.load(root / "ref.pt")
    out = tmp_path / "hf"
    index = ckptio_safetensors.consolidate(str(root / "ck"), str(out), max_shard_size=20_000, progress=False)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    on_disk = json.loads((out / "model.safetensors.index.json").read_text())
    assert on_disk == index and on_disk["metadata"]["total_size"] == sum(v.numel() * 4 for v in ref.values())
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # staging dir is gone

    tiny_llama_config().save_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    hf_sd = hf.state_dict()
    assert all(torch.equal(hf_sd[k], ref[k]) for k in ref)
    mine = build_llama(9, shard=False)
    mine.load_state_dict(ref)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=input_ids()).logits, mine(input_ids=input_ids()).logits)


def test_consolidation_split_across_ranks(saved: tuple[Path, list[dict]]) -> None:
    root, _ = saved
    ref = torch.load(root / "ref.pt")
    out = root / "hf2"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
