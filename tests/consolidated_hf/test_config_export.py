"""Exports that load as they are: ``ckptio consolidate`` and the consolidated-hf addon write
``config.json`` and ``generation_config.json`` (from ``--config``/``config=``, the checkpoint's
artifacts or the model), so ``AutoModelForCausalLM.from_pretrained(out)`` needs nothing added; the
base model's dtype is restored when it is known."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio import cli
from ckptio.ext import pretrained_files
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.addons._models import logits, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class _ConfigArtifacts:
    """Writes the model's config files into the checkpoint, as the Trainer integration does."""

    name = "config-artifacts"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
        if ctx.is_coordinator:
            for obj in (self.model.config, self.model.generation_config):
                for name, data in pretrained_files(obj).items():
                    ctx.write_bytes(name, data)


def _dtypes(out: Path) -> set[str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    found = set()
    for fname in set(index["weight_map"].values()):
        with safe_open(str(out / fname), "pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return found


def _consolidate(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["consolidate", *args, "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 0, err


@pytest.fixture
def bf16_base(tmp_path: Path) -> Path:
    """A base model in bf16 on disk, as downloaded from the Hub."""
    base = tmp_path / "base"
    tiny_llama().to(torch.bfloat16).save_pretrained(base)
    return base


def test_consolidate_writes_the_checkpoints_config_and_loads_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_llama()
    ck, out = tmp_path / "ck", tmp_path / "out"
    ckptio.save({"model": ckptio.ModelState(model)}, str(ck), addons=[_ConfigArtifacts(model)])
    assert "config.json" in ckptio.manifest(str(ck)).files
    _consolidate([str(ck), str(out)], capsys)
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_consolidate_with_config_restores_the_base_models_dtype(
    tmp_path: Path, bf16_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fine-tuned in fp32 from a bf16 base: the export is bf16 again, as the base config says."""
    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    ck = tmp_path / "ck"
    ckptio.save({"model": ckptio.ModelState(model)}, str(ck))  # no config in the checkpoint
    expected = logits(AutoModelForCausalLM.from_pretrained(bf16_base).eval())

    out = tmp_path / "out"
    _consolidate([str(ck), str(out), "--config", str(bf16_base)], capsys)
    assert _dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), expected)

    # a config file works too; an explicit --dtype wins and the config says so
    out2 = tmp_path / "out2"
    _consolidate([str(ck), str(out2), "--config", str(bf16_base / "config.json"), "--dtype", "fp32"], capsys)
    assert _dtypes(out2) == {"F32"} and json.loads((out2 / "config.json").read_text())["dtype"] == "float32"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out2).eval()), logits(model.eval()))


def test_consolidate_dtype_reference_names_the_dtype_in_the_config(
    tmp_path: Path, bf16_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    ck, out = tmp_path / "ck", tmp_path / "out"
    ckptio.save({"model": ckptio.ModelState(model)}, str(ck), addons=[_ConfigArtifacts(model)])
    assert json.loads((ck / "config.json").read_text())["dtype"] == "float32"  # the training dtype
    _consolidate([str(ck), str(out), "--dtype-reference", str(bf16_base)], capsys)
    assert _dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(AutoModelForCausalLM.from_pretrained(bf16_base).eval()))


def test_consolidate_without_a_config_says_so_and_a_missing_one_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ckptio_safetensors import consolidate

    ck = tmp_path / "ck"
    ckptio.save({"model": ckptio.ModelState(tiny_llama())}, str(ck))
    with caplog.at_level("WARNING"):
        consolidate(str(ck), str(tmp_path / "out"), progress=False)
    assert "config" in caplog.text and not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(ckptio.CheckpointNotFoundError, match="config.json"):
        consolidate(str(ck), str(tmp_path / "out2"), progress=False, config=str(tmp_path))


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_addon_with_a_base_config_exports_in_the_base_dtype(
    tmp_path: Path, bf16_base: Path, source: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    url = tmp_path / "ck"
    ckptio.save(
        {"model": ckptio.ModelState(model)},
        str(url),
        final=True,
        addons=[("consolidated-hf", {"config": str(bf16_base), "source": source})],
    )
    out = url / "consolidated"
    assert _dtypes(out) == {"BF16"} and (out / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(AutoModelForCausalLM.from_pretrained(bf16_base).eval()))


def test_addon_takes_the_models_config_with_its_own_dtype(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)  # config.dtype unset: the weights' dtype is written
    url = tmp_path / "ck"
    ckptio.save({"model": ckptio.ModelState(model)}, str(url), final=True, addons=["consolidated-hf"])
    out = url / "consolidated"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16" and _dtypes(out) == {"BF16"}
    # as transformers' own save_pretrained + from_pretrained give it back (a bf16 model built in
    # fp32 has fp32-computed buffers that from_pretrained recomputes in bf16)
    model.save_pretrained(tmp_path / "hf")
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected)


def test_addon_falls_back_to_the_checkpoints_config_artifact(tmp_path: Path) -> None:
    """A model object without ``.config`` (a wrapper, a custom module) exports with the config
    the checkpoint holds as an artifact."""
    model = tiny_llama()

    class Bare(torch.nn.Module):  # same FQNs, no config attribute
        def __init__(self) -> None:
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

    url = tmp_path / "ck"
    ckptio.save(
        {"model": ckptio.ModelState(Bare())},
        str(url),
        final=True,
        addons=[_ConfigArtifacts(model), "consolidated-hf"],
    )
    loaded = AutoModelForCausalLM.from_pretrained(url / "consolidated").eval()
    assert torch.equal(logits(loaded), logits(model))
