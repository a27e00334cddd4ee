"""The consolidated-hf addon: a step's ``consolidated/`` loads with transformers' ``from_pretrained``."""

from __future__ import annotations

import json
import os

import ckptio
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.addons._models import WORDS, logits, peft_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _from_pretrained(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_every_save_exports_a_loadable_model_and_tokenizer(tmp_path, source):
    model, tok = tiny_llama(), tiny_tokenizer()
    addon = ("consolidated-hf", {"mode": "every", "tokenizer": tok, "source": source})
    with ckptio.CheckpointManager(tmp_path, addons=[addon]) as mgr:
        mgr.save(1, {"model": ckptio.ModelState(model)})
        expected_1 = logits(model)
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
        mgr.save(2, {"model": ckptio.ModelState(model)})
    for step, expected in ((1, expected_1), (2, logits(model))):
        out = tmp_path / f"step_{step:08d}" / "consolidated"
        names = set(os.listdir(out))
        assert {
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00001.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        } <= names
        assert not [n for n in os.listdir(out.parent) if "partial" in n]
        assert torch.equal(logits(_from_pretrained(str(out))), expected)
        loaded_tok = AutoTokenizer.from_pretrained(str(out))
        text = " ".join(WORDS[:5]) + " unknownword"
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    ckptio.verify(str(tmp_path / "step_00000002"))  # the export does not disturb the checkpoint


def test_final_mode_exports_only_the_final_save_and_off_never(tmp_path):
    model = tiny_llama()
    with ckptio.CheckpointManager(tmp_path / "a", addons=["consolidated-hf"]) as mgr:  # default: final
        mgr.save(1, {"model": ckptio.ModelState(model)})
        mgr.save(2, {"model": ckptio.ModelState(model)}, final=True)
    assert not (tmp_path / "a" / "step_00000001" / "consolidated").exists()
    assert (tmp_path / "a" / "step_00000002" / "consolidated" / "model.safetensors.index.json").exists()
    with ckptio.CheckpointManager(tmp_path / "b", addons=[("consolidated-hf", {"mode": "off"})]) as mgr:
        mgr.save(1, {"model": ckptio.ModelState(model)}, final=True)
    assert not (tmp_path / "b" / "step_00000001" / "consolidated").exists()
    with pytest.raises(ValueError, match="mode"):
        ckptio.save(
            {"model": ckptio.ModelState(model)},
            str(tmp_path / "c"),
            addons=[("consolidated-hf", {"mode": "x"})],
        )


def test_async_export_uses_the_weights_of_the_save_and_retention_removes_it(tmp_path):
    model = tiny_llama()
    expected = logits(model)
    with ckptio.CheckpointManager(
        tmp_path,
        async_save=True,
        retention=ckptio.KeepLatest(1),
        addons=[("consolidated-hf", {"mode": "every"})],
    ) as mgr:
        mgr.save(1, {"model": ckptio.ModelState(model)})
        with torch.no_grad():  # training goes on while the export runs in the background
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        assert torch.equal(
            logits(_from_pretrained(str(tmp_path / "step_00000001" / "consolidated"))), expected
        )
        mgr.save(2, {"model": ckptio.ModelState(model)})
        mgr.wait()
    assert torch.equal(
        logits(_from_pretrained(str(tmp_path / "step_00000002" / "consolidated"))), logits(model)
    )
    assert not (tmp_path / "step_00000001").exists()  # retention deleted the step with its export


def test_base_model_dtypes_and_shard_layout_are_restored(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    base_index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)  # fine-tuned in fp32
    assert model.lm_head.weight.dtype == torch.float32
    url = str(tmp_path / "ck")
    ckptio.save(
        {"model": ckptio.ModelState(model)},
        url,
        is_final=True,
        addons=[("consolidated-hf", {"base_model_path": str(tmp_path / "base")})],
    )
    out = os.path.join(url, "consolidated")
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    assert index["weight_map"] == base_index["weight_map"]
    for fname in set(index["weight_map"].values()):
        with safe_open(os.path.join(out, fname), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), logits(model.eval()))


def test_peft_models_are_refused_with_a_hint(tmp_path):
    with pytest.raises(ckptio.CheckpointError, match="merge_and_unload"):
        ckptio.save(
            {"model": ckptio.ModelState(peft_model())},
            str(tmp_path / "ck"),
            is_final=True,
            addons=["consolidated-hf"],
        )


def test_a_failed_export_leaves_no_staging_and_the_step_intact(tmp_path):
    """The export is staged through ckptio's commit protocol: when it fails (here: no config.json
    to write), its staging directory and lease go, and the committed step is untouched."""
    model = torch.nn.Linear(4, 4)  # no .config: the export cannot write config.json
    url = tmp_path / "ck"
    with pytest.raises(ckptio.CheckpointError, match="config"):
        ckptio.save({"model": ckptio.ModelState(model)}, str(url), is_final=True, addons=["consolidated-hf"])
    hidden = [n for n in os.listdir(url) if n.startswith(".")]
    assert hidden == [], f"staging or lease left behind: {hidden}"
    assert not (url / "consolidated").exists()
    ckptio.verify(str(url))
