"""The peft addon with real transformers + peft models: ckptio <-> PEFT's own on-disk format."""

from __future__ import annotations

import json
import os

import ckptio
import ckptio_peft
import pytest
import safetensors.torch
import torch
from ckptio.plugins import get_format
from peft import PeftModel
from safetensors import safe_open

from tests.addons._models import fresh_peft_model, logits, peft_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _keys(path: str) -> list[str]:
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_loads_with_peft_from_pretrained(tmp_path, use_dora):
    model = peft_model(use_dora=use_dora)
    expected = logits(model)
    tok = tiny_tokenizer()
    with ckptio.CheckpointManager(tmp_path / "run", addons=[("peft", {"tokenizer": tok})]) as mgr:
        mgr.save(100, {"model": ckptio.ModelState(model)})
    step = tmp_path / "run" / "step_00000100"

    # same file names and keys as PEFT's own save_pretrained
    model.save_pretrained(tmp_path / "hf")
    assert _keys(str(step / "adapter_model.safetensors")) == _keys(
        str(tmp_path / "hf" / "adapter_model.safetensors")
    )
    keys = _keys(str(step / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    if use_dora:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    cfg = json.loads((step / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["use_dora"] is use_dora
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    # artifacts are part of the committed checkpoint
    files = ckptio.manifest(str(step)).files
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(files)
    ckptio.verify(str(step))

    loaded = PeftModel.from_pretrained(tiny_llama(), str(step)).eval()
    assert torch.equal(logits(loaded), expected)


def test_native_entry_holds_only_the_adapter_and_resumes(tmp_path):
    model = peft_model(use_dora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(torch.randint(0, 128, (2, 5))).logits.sum().backward()
    opt.step()
    model.eval()
    expected = logits(model)
    url = str(tmp_path / "ck")
    ckptio.save(
        {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt)}, url, addons=["peft"]
    )

    m = ckptio.manifest(url)
    stored = [e.name for e in get_format(m.format).tensors(*_open(url), m) if e.name.startswith("model.")]
    assert stored and all("lora_" in n for n in stored), stored  # no base weights in the native entry

    dest = fresh_peft_model(use_dora=True)
    dest_opt = torch.optim.AdamW([p for p in dest.parameters() if p.requires_grad], lr=1e-3)
    before = dict(dest.named_parameters())["base_model.model.model.embed_tokens.weight"].clone()
    ckptio.load(
        {"model": ckptio.ModelState(dest), "optim": ckptio.OptimizerState(dest, dest_opt)},
        url,
        addons=["peft"],
    )
    assert torch.equal(logits(dest), expected)
    assert torch.equal(dict(dest.named_parameters())["base_model.model.model.embed_tokens.weight"], before)
    s_ref, s_new = opt.state_dict()["state"], dest_opt.state_dict()["state"]
    assert s_ref.keys() == s_new.keys()
    assert all(torch.equal(s_ref[i]["exp_avg"], s_new[i]["exp_avg"]) for i in s_ref)


def _open(url: str):
    from ckptio.checkpoint import open_backend

    u, backend = open_backend(url)
    return backend, u.path


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_save_pretrained_loads_through_ckptio(tmp_path, use_dora):
    model = peft_model(use_dora=use_dora)
    model.save_pretrained(tmp_path / "hf")
    dest = fresh_peft_model(use_dora=use_dora)
    assert not torch.equal(logits(dest), logits(model))
    result = ckptio_peft.load_adapter(dest, str(tmp_path / "hf"))
    assert not result.missing and not result.unexpected and result.config["use_dora"] is use_dora
    assert torch.equal(logits(dest), logits(model))


def test_legacy_dora_magnitude_name_loads(tmp_path):
    model = peft_model(use_dora=True)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    legacy = {
        (k + ".default.weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in tensors.items()
    }
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in legacy)
    safetensors.torch.save_file(legacy, str(path), metadata={"format": "pt"})
    dest = fresh_peft_model(use_dora=True)
    ckptio_peft.load_adapter(dest, str(tmp_path / "hf"))
    assert torch.equal(logits(dest), logits(model))


def test_adapter_in_subdir_and_mismatch_is_refused(tmp_path):
    model = peft_model()
    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(model)}, url, addons=[("peft", {"subdir": "adapter"})])
    assert os.path.exists(os.path.join(url, "adapter", "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_llama(), os.path.join(url, "adapter")).eval()
    assert torch.equal(logits(loaded), logits(model))
    other = fresh_peft_model(targets=("q_proj", "k_proj", "v_proj"))
    with pytest.raises(ckptio.StateMismatchError, match="k_proj"):
        ckptio_peft.load_adapter(other, url, subdir="adapter")
    with pytest.raises(ckptio.CheckpointNotFoundError, match="adapter_model.safetensors"):
        ckptio_peft.load_adapter(other, url)


class _NemoStyleLoRA(torch.nn.Module):
    """A LoRA model that is not a PEFT model (NeMo AutoModel style names)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.q_proj.lora_A = torch.nn.Linear(8, 2, bias=False)
        self.q_proj.lora_B = torch.nn.Linear(2, 8, bias=False)
        self.q_proj.lora_magnitude = torch.nn.Parameter(torch.rand(8))


def test_non_peft_model_uses_options_for_the_config(tmp_path):
    model = _NemoStyleLoRA()
    url = str(tmp_path / "ck")
    ckptio.save(
        {"model": ckptio.ModelState(model)},
        url,
        addons=[
            (
                "peft",
                {
                    "r": 2,
                    "lora_alpha": 4,
                    "target_modules": ["q_proj"],
                    "use_dora": True,
                    "base_model_name_or_path": "tiny/base",
                },
            )
        ],
    )
    cfg = json.loads(open(os.path.join(url, "adapter_config.json")).read())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["use_dora"]) == (2, 4, ["q_proj"], True)
    assert cfg["base_model_name_or_path"] == "tiny/base"
    assert _keys(os.path.join(url, "adapter_model.safetensors")) == [
        "base_model.model.q_proj.lora_A.weight",
        "base_model.model.q_proj.lora_B.weight",
        "base_model.model.q_proj.lora_magnitude_vector",
    ]


def test_without_a_model_the_error_says_what_to_do(tmp_path):
    with pytest.raises(ckptio.CheckpointError, match="ModelState"):
        ckptio.save({"w": torch.zeros(2)}, str(tmp_path / "ck"), addons=["peft"])


# -- FSDP2, 2 ranks --------------------------------------------------------------------------
def _fsdp_save(rank: int, world: int, url: str) -> list[str]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = peft_model(use_dora=True)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor) and "lora_" in n]
    ckptio.save({"model": ckptio.ModelState(model)}, url, addons=["peft"])
    # and back into a fresh sharded model through load_adapter
    dest = fresh_peft_model(use_dora=True)
    for layer in dest.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(dest)
    ckptio_peft.load_adapter(dest, url)
    full = {n: p.full_tensor() for n, p in dest.named_parameters() if "lora_" in n}
    ref = {n: p.detach() for n, p in peft_model(use_dora=True).named_parameters() if "lora_" in n}
    assert full.keys() == ref.keys() and all(torch.equal(full[n], ref[n]) for n in ref)
    return sharded


@pytest.mark.multirank
@pytest.mark.slow
def test_fsdp2_two_ranks_gathers_the_adapter_once(tmp_path):
    from tests.e2e._ranks import run_ranks

    url = str(tmp_path / "ck")
    sharded = run_ranks(_fsdp_save, 2, args=(url,))
    assert sharded[0], "the adapter weights should be FSDP2-sharded DTensors"
    loaded = PeftModel.from_pretrained(tiny_llama(), url).eval()
    assert torch.equal(logits(loaded), logits(peft_model(use_dora=True)))
