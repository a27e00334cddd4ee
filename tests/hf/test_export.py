"""HF export of a trained model through ckptio loads with ``from_pretrained``: MoE experts are
written one tensor each, as ``save_pretrained`` writes them (transformers' conversion, reversed)."""

from __future__ import annotations

import json
from pathlib import Path

import ckptio
import ckptio_safetensors
import pytest
import torch
from ckptio.ext import open_backend

from ._models import build, input_ids, logits, reference

VOCAB = {"llama": 256, "mixtral": 128, "qwen3_moe": 128}


def _trained(kind: str) -> torch.nn.Module:
    model = build(kind, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = input_ids(VOCAB[kind])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model


def _weight_map(d: Path) -> dict[str, str]:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["native", "safetensors"])
def test_consolidated_export_loads_with_from_pretrained(tmp_path: Path, kind: str, fmt: str) -> None:
    model = _trained(kind)
    url = str(tmp_path / "ck") if fmt == "native" else f"safetensors+file://{tmp_path}/ck"
    ckptio.save({"model": ckptio.ModelState(model), "step": 1}, url)
    out = tmp_path / "hf"
    ckptio_safetensors.consolidate(
        str(tmp_path / "ck"), str(out), config=model.config.to_dict(), max_shard_size="100KB", progress=False
    )
    names = _weight_map(out)
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)
    if kind != "llama":
        assert any(".experts.3." in n for n in names)  # one tensor per expert, as save_pretrained
    if kind == "mixtral":
        assert any("block_sparse_moe.experts.0.w1.weight" in n for n in names)
    ref = reference(out, torch.float32)
    assert torch.equal(logits(ref, VOCAB[kind]), logits(model, VOCAB[kind]))
    # and back into a model through ckptio, strictly
    again = build(kind, seed=8)
    ckptio.load({"model": ckptio.ModelState(again)}, str(out))
    assert torch.equal(logits(again, VOCAB[kind]), logits(model, VOCAB[kind]))


def test_export_of_a_damaged_fused_tensor_is_caught(tmp_path: Path) -> None:
    model = _trained("mixtral")
    ckptio.save({"model": ckptio.ModelState(model)}, f"safetensors+file://{tmp_path}/ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    entry = next(
        e for e in manifest["format_metadata"]["storage"] if e["fqn"].endswith("experts.gate_up_proj")
    )
    f = tmp_path / "ck" / entry["file"]
    raw = bytearray(f.read_bytes())
    raw[entry["pos"] + 5] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(ckptio.CorruptCheckpointError, match="checksum"):
        ckptio_safetensors.consolidate(
            str(tmp_path / "ck"), str(tmp_path / "hf"), config=model.config.to_dict(), progress=False
        )


def test_write_hf_checkpoint_reverses_the_conversion(tmp_path: Path) -> None:
    model = _trained("qwen3_moe")
    _, backend = open_backend(str(tmp_path))
    out = tmp_path / "hf"
    index = ckptio_safetensors.write_hf_checkpoint(
        dict(model.state_dict()), backend, str(out), model=model, max_shard_size="50KB"
    )
    assert any(".mlp.experts.2.up_proj.weight" in n for n in index["weight_map"])
    model.config.save_pretrained(out)
    assert torch.equal(logits(reference(out), 128), logits(model, 128))


def test_hf_tensors_are_views_of_the_fused_tensors() -> None:
    model = build("mixtral", seed=2)
    sd = model.state_dict()
    tensors = ckptio_safetensors.hf_tensors(sd, model)
    shape, dtype, get = tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    t = get()
    fused = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert shape == (48, 32) and dtype == torch.float32
    assert t.data_ptr() == fused[2, 48:].data_ptr() and torch.equal(t, fused[2, 48:])


def test_export_from_fused_tensors_sharded_by_experts(tmp_path: Path) -> None:
    """Fused expert tensors stored in two chunks (as two FSDP2 ranks write them): each exported
    expert is cut from the chunk that holds it."""
    from safetensors.torch import save_file

    model = _trained("mixtral")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = tmp_path / "sharded"
    src.mkdir()
    halves: list[dict[str, torch.Tensor]] = [{}, {}]
    sharding: list[dict[str, dict[str, list[int]]]] = [{}, {}]
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n = v.shape[0] // 2
            for r in (0, 1):
                halves[r][k] = v[r * n : (r + 1) * n].contiguous()
                sharding[r][k] = {"global_shape": list(v.shape), "offsets": [r * n] + [0] * (v.dim() - 1)}
        else:
            halves[0][k] = v
    for r in (0, 1):
        meta = {"format": "pt", "ckptio_sharding": json.dumps(sharding[r])}
        save_file(halves[r], str(src / f"part-{r}.safetensors"), metadata=meta)
    out = tmp_path / "hf"
    ckptio_safetensors.consolidate(str(src), str(out), config=model.config.to_dict(), progress=False)
    assert any("block_sparse_moe.experts.3.w2.weight" in n for n in _weight_map(out))
    assert torch.equal(logits(reference(out), 128), logits(model, 128))
