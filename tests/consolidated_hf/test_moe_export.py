"""The consolidated-hf addon exports MoE models as ``save_pretrained`` does: transformers 5 fuses a
Mixtral's or Qwen3-MoE's experts in memory (``mlp.experts.gate_up_proj``, ``down_proj``); the
export reverses that conversion, one tensor per expert, and loads with ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from safetensors import safe_open

from tests.e2e._ranks import run_ranks
from tests.hf._models import build, input_ids, logits, reference

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB = {"mixtral": 128, "qwen3_moe": 128}


def _trained(kind: str) -> torch.nn.Module:
    """One optimizer step, so that every expert differs from its initialisation."""
    model = build(kind, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = input_ids(VOCAB[kind])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model


def _stored_names(out: Path) -> set[str]:
    names: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == names
    return names


def _check_per_expert(kind: str, names: set[str]) -> None:
    assert not [n for n in names if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if kind == "mixtral":
        expected = {
            f"model.layers.{i}.block_sparse_moe.experts.{e}.w{w}.weight"
            for i in (0, 1)
            for e in range(4)
            for w in (1, 2, 3)
        }
    else:
        expected = {
            f"model.layers.{i}.mlp.experts.{e}.{p}.weight"
            for i in (0, 1)
            for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")
        }
    assert expected <= names


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_final_save_exports_one_tensor_per_expert(tmp_path: Path, kind: str, source: str) -> None:
    model = _trained(kind)
    state = {"model": ckptio.ModelState(model)}
    with ckptio.CheckpointManager(
        str(tmp_path / "run"), addons=[("consolidated-hf", {"source": source})]
    ) as mgr:
        mgr.save(1, state, final=True)
    out = tmp_path / "run" / "step_00000001" / "consolidated"
    _check_per_expert(kind, _stored_names(out))
    ref = reference(out, torch.float32)
    assert torch.equal(logits(ref, VOCAB[kind]), logits(model, VOCAB[kind]))
    # the stored names are the ones save_pretrained writes
    model.save_pretrained(tmp_path / "sp")
    assert _stored_names(out) == _stored_names_plain(tmp_path / "sp")


def _stored_names_plain(d: Path) -> set[str]:
    names: set[str] = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    return names


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_moe_export_restores_the_base_models_dtypes_and_layout(tmp_path: Path, source: str) -> None:
    """base_model_path's dtypes and shard layout are keyed by the names on disk: with the experts
    written one by one, they apply to every expert (and the shards mirror the base's files)."""
    base = build("mixtral", seed=4).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    base_index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 1
    model = _trained("mixtral")  # fine-tuned in fp32
    addon = ("consolidated-hf", {"source": source, "base_model_path": str(tmp_path / "base")})
    ckptio.save({"model": ckptio.ModelState(model)}, str(tmp_path / "ck"), final=True, addons=[addon])
    out = tmp_path / "ck" / "consolidated"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    for fname in set(index["weight_map"].values()):
        with safe_open(str(out / fname), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    rounded = build("mixtral", seed=0)  # the fine-tuned weights as the bf16 export holds them
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.equal(logits(reference(out, torch.float32), 128), logits(rounded, 128))


def test_tied_llama_export_still_drops_the_alias(tmp_path: Path) -> None:
    model = build("llama", seed=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with ckptio.CheckpointManager(str(tmp_path / "run"), addons=["consolidated-hf"]) as mgr:
        mgr.save(1, {"model": ckptio.ModelState(model)}, final=True)
    out = tmp_path / "run" / "step_00000001" / "consolidated"
    assert "lm_head.weight" not in _stored_names(out)
    assert torch.equal(logits(reference(out), 256), logits(model, 256))


def _fsdp_export(rank: int, world: int, kind: str, root: str, source: str) -> dict[str, Any]:
    """On each rank: the trained model, FSDP2-sharded (experts split across ranks), saved as the
    final step with the consolidated-hf addon."""
    import ckptio_safetensors.consolidation as consolidation
    from torch.distributed.fsdp import fully_shard

    checked: list[str] = []  # the tensors whose stored chunks this rank checks whole
    verify_cut = consolidation.verify_cut

    def record(src: Any, names: Any) -> None:
        names = list(names)
        checked.extend(names)
        verify_cut(src, names)

    consolidation.verify_cut = record
    model = _trained(kind)
    expected = logits(model, VOCAB[kind])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with ckptio.CheckpointManager(root, addons=[("consolidated-hf", {"source": source})]) as mgr:
        mgr.save(1, {"model": ckptio.ModelState(model)}, final=True)
    return {"expected": expected, "checked": checked}


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_fsdp2_two_ranks_export_per_expert(tmp_path: Path, source: str) -> None:
    kind = "qwen3_moe"
    results = run_ranks(_fsdp_export, 2, args=(kind, str(tmp_path / "run"), source), timeout=240)
    out = tmp_path / "run" / "step_00000001" / "consolidated"
    _check_per_expert(kind, _stored_names(out))
    # one export, written once: the ranks split the files (no second copy left in a staging dir)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    ref = reference(out, torch.float32)
    assert torch.equal(logits(ref, VOCAB[kind]), results[0]["expected"])
    if source == "checkpoint":  # each rank checks the chunks of its own files only, and all are checked
        first, second = (set(r["checked"]) for r in results)
        assert not first & second, first & second
        assert first | second == _stored_names(out)


def _damaged_export(rank: int, world: int, root: str) -> dict[str, Any]:
    """Two FSDP2 ranks save a Qwen3-MoE (each fused expert tensor cut in two chunks), one byte of
    a fused chunk is flipped, then both export it as HF: only the ranks whose files are cut from
    that chunk read it, yet every rank must report damage."""
    import ckptio_safetensors
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = _trained("qwen3_moe")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ckptio.save({"model": ckptio.ModelState(model)}, f"{root}/ck")
    if rank == 0:
        manifest = json.loads(Path(root, "ck", "manifest.json").read_text())
        entry = next(
            e for e in manifest["format_metadata"]["storage"] if e["fqn"].endswith("experts.gate_up_proj")
        )
        f = Path(root, "ck", entry["file"])
        raw = bytearray(f.read_bytes())
        raw[entry["pos"] + entry["length"] // 2] ^= 0x40
        f.write_bytes(bytes(raw))
    dist.barrier()
    try:
        ckptio_safetensors.consolidate(
            f"{root}/ck",
            f"{root}/hf",
            config=model.config.to_dict(),
            process_group=dist.group.WORLD,
            progress=False,
        )
    except ckptio.CheckpointError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def test_fsdp2_export_of_a_damaged_expert_chunk_fails_on_every_rank(tmp_path: Path) -> None:
    results = run_ranks(_damaged_export, 2, args=(str(tmp_path),), timeout=240)
    assert [r["error"] for r in results] == ["CorruptCheckpointError"] * 2, results
    assert all("checksum" in r["message"] for r in results)
    # nothing published, nothing left behind beside the source checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
