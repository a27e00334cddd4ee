"""PEFT adapters both ways through ``ckptio.save``/``ckptio.load(..., addons=["peft"])``, with real
transformers + peft models: PEFT's ``save_pretrained`` directories load through ckptio, ckptio's
checkpoints load with ``PeftModel.from_pretrained``; LoRA, DoRA (current and legacy names),
``modules_to_save`` heads, wrapped models, and adapter-only resume states."""

from __future__ import annotations

import os

import ckptio
import ckptio_peft
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from tests.addons._models import logits, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

HEAD = "base_model.model.lm_head"


def _peft(use_dora: bool = False, head: bool = False, trained: bool = True, seed: int = 0) -> torch.nn.Module:
    """LoRA/DoRA on q/v over the tiny Llama, optionally with ``lm_head`` in ``modules_to_save``;
    ``trained``: non-trivial adapter and head weights (a fresh LoRA's B is zero)."""
    model = get_peft_model(
        tiny_llama(seed),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_dora=use_dora,
            modules_to_save=["lm_head"] if head else None,
            task_type="CAUSAL_LM",
        ),
    )
    if trained:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _keys(path: str) -> list[str]:
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


def _stored(url: str) -> set[str]:
    return set(ckptio.manifest(url).format_metadata["dcp"]["state"])


def _from_pretrained(path: str) -> torch.nn.Module:
    return PeftModel.from_pretrained(tiny_llama(), path).eval()


CASES = [(False, False), (True, False), (False, True), (True, True)]
IDS = ["lora", "dora", "lora+head", "dora+head"]


@pytest.mark.parametrize("use_dora,head", CASES, ids=IDS)
def test_a_save_pretrained_directory_loads_through_ckptio_load(tmp_path, use_dora, head):
    src = _peft(use_dora, head)
    hf = str(tmp_path / "hf")
    src.save_pretrained(hf)
    if head:
        assert f"{HEAD}.weight" in _keys(os.path.join(hf, "adapter_model.safetensors"))
    dest = _peft(use_dora, head, trained=False)
    assert not torch.equal(logits(dest), logits(src))
    result = ckptio.load({"model": ckptio.ModelState(dest)}, hf, addons=["peft"])
    assert not result.missing and not result.unexpected
    assert torch.equal(logits(dest), logits(_from_pretrained(hf)))
    assert torch.equal(logits(dest), logits(src))


@pytest.mark.parametrize("use_dora,head", CASES, ids=IDS)
def test_a_ckptio_checkpoint_loads_with_peft_and_resumes_through_ckptio(tmp_path, use_dora, head):
    src = _peft(use_dora, head)
    opt = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad], lr=1e-3)
    url = str(tmp_path / "ck")
    ckptio.save(
        {"model": ckptio.ModelState(src), "optim": ckptio.OptimizerState(src, opt)}, url, addons=["peft"]
    )

    # the adapter file is the one PEFT writes, key for key
    src.save_pretrained(tmp_path / "hf")
    assert _keys(os.path.join(url, "adapter_model.safetensors")) == _keys(
        str(tmp_path / "hf" / "adapter_model.safetensors")
    )
    assert torch.equal(logits(_from_pretrained(url)), logits(src))
    # the resume entry holds the adapter and the trained head, not the base weights
    stored = _stored(url)
    assert (f"model.{HEAD}.modules_to_save.default.weight" in stored) is head
    assert not any(".base_layer." in k or "original_module" in k for k in stored)

    dest = _peft(use_dora, head, trained=False)
    dest_opt = torch.optim.AdamW([p for p in dest.parameters() if p.requires_grad], lr=1e-3)
    ckptio.load(
        {"model": ckptio.ModelState(dest), "optim": ckptio.OptimizerState(dest, dest_opt)},
        url,
        addons=["peft"],
    )
    assert torch.equal(logits(dest), logits(src))


def test_legacy_dora_names_load_through_ckptio_load(tmp_path):
    src = _peft(use_dora=True)
    src.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf" / "adapter_model.safetensors")
    tensors = safetensors.torch.load_file(path)
    legacy = {
        (k + ".default.weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in tensors.items()
    }
    safetensors.torch.save_file(legacy, path, metadata={"format": "pt"})
    for addons in (["peft"], ["dora", "peft"], ["peft", "dora"]):
        dest = _peft(use_dora=True, trained=False)
        ckptio.load({"model": ckptio.ModelState(dest)}, str(tmp_path / "hf"), addons=addons)
        assert torch.equal(logits(dest), logits(src)), addons


def test_a_peft_directory_holds_no_optimizer_state(tmp_path):
    src = _peft()
    src.save_pretrained(tmp_path / "hf")
    dest = _peft(trained=False)
    opt = torch.optim.AdamW([p for p in dest.parameters() if p.requires_grad])
    state = {"model": ckptio.ModelState(dest), "optim": ckptio.OptimizerState(dest, opt)}
    with pytest.raises(ckptio.StateMismatchError, match="optim"):
        ckptio.load(state, str(tmp_path / "hf"), addons=["peft"])
    result = ckptio.load(state, str(tmp_path / "hf"), addons=["peft"], strict=False)
    assert result.missing and all(k.startswith("optim.") for k in result.missing)
    assert torch.equal(logits(dest), logits(src))


# -- wrapped models ----------------------------------------------------------------------------
def _checkpoint_wrapped(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
    )
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    return model


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model)  # never run: the wrapper (``_orig_mod``) is what matters here


@pytest.mark.parametrize(
    "wrap", [_checkpoint_wrapped, _compiled], ids=["checkpoint_wrapper", "torch_compile"]
)
def test_adapter_keys_are_found_through_wrappers(tmp_path, wrap):
    plain = _peft(use_dora=True, head=True)
    expected = logits(plain)
    n_keys = len(ckptio_peft.adapter_names(plain, list(get_model_state_dict(plain))))
    wrapped = wrap(_peft(use_dora=True, head=True))
    assert len(ckptio_peft.adapter_names(wrapped, list(get_model_state_dict(wrapped)))) == n_keys == 13

    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(wrapped)}, url, addons=["peft"])
    assert torch.equal(logits(_from_pretrained(url)), expected)

    plain.save_pretrained(tmp_path / "hf")
    for source in (str(tmp_path / "hf"), url):
        inner = _peft(use_dora=True, head=True, trained=False)
        ckptio.load({"model": ckptio.ModelState(wrap(inner))}, source, addons=["peft"])
        assert torch.equal(logits(inner), expected), source
    inner = _peft(use_dora=True, head=True, trained=False)
    assert len(ckptio_peft.load_adapter(wrap(inner), str(tmp_path / "hf")).loaded) == n_keys
    assert torch.equal(logits(inner), expected)


# -- adapter-only model state --------------------------------------------------------------------
def test_adapters_only_state_is_small_and_resumes_strictly(tmp_path):
    src = _peft(use_dora=True)
    opt = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad], lr=1e-3)
    src.train()
    src(torch.randint(0, 128, (2, 5))).logits.sum().backward()
    opt.step()
    src.eval()
    full, small = str(tmp_path / "full"), str(tmp_path / "small")
    ckptio.save({"model": ckptio.ModelState(src)}, full)
    ckptio.save(
        {"model": ckptio.ModelState(src, adapters_only=True), "optim": ckptio.OptimizerState(src, opt)}, small
    )
    # adapter + its optimizer state against the model alone: still several times smaller
    assert ckptio.manifest(small).total_bytes * 5 < ckptio.manifest(full).total_bytes
    stored = {k for k in _stored(small) if k.startswith("model.")}
    assert stored and all("lora_" in k for k in stored), stored

    dest = _peft(use_dora=True, trained=False)
    base_before = dest.base_model.model.model.embed_tokens.weight.clone()
    dest_opt = torch.optim.AdamW([p for p in dest.parameters() if p.requires_grad], lr=1e-3)
    ckptio.load(
        {
            "model": ckptio.ModelState(dest, adapters_only=True),
            "optim": ckptio.OptimizerState(dest, dest_opt),
        },
        small,
        strict=True,
    )
    assert torch.equal(logits(dest), logits(src))
    assert torch.equal(dest.base_model.model.model.embed_tokens.weight, base_before)
    ref, got = opt.state_dict()["state"], dest_opt.state_dict()["state"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[i]["exp_avg"], got[i]["exp_avg"]) for i in ref)


def test_adapters_only_state_keeps_the_head_and_goes_with_the_peft_addon(tmp_path):
    src = _peft(head=True)
    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(src, adapters_only=True)}, url, addons=["peft"])
    assert f"model.{HEAD}.modules_to_save.default.weight" in _stored(url)
    assert torch.equal(logits(_from_pretrained(url)), logits(src))
    dest = _peft(head=True, trained=False)
    ckptio.load({"model": ckptio.ModelState(dest, adapters_only=True)}, url, addons=["peft"])
    assert torch.equal(logits(dest), logits(src))
    # and the PEFT directory of the same adapter loads into the adapter-only state
    src.save_pretrained(tmp_path / "hf")
    dest = _peft(head=True, trained=False)
    ckptio.load({"model": ckptio.ModelState(dest, adapters_only=True)}, str(tmp_path / "hf"), addons=["peft"])
    assert torch.equal(logits(dest), logits(src))
