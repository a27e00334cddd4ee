"""Loading Hugging Face directories with ``ckptio.load``: dtypes, tied weights, transformers'
conversion mapping (MoE experts), meta-device models, FSDP2 on two ranks reading their share."""

from __future__ import annotations

import json
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio_safetensors import reset_non_persistent_buffers
from safetensors.torch import load_file, save_file

from tests.e2e._ranks import run_ranks

from ._models import build, llama_config, load_meta_fsdp, logits, reference, save_hf, tensor_bytes


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfdirs")
    return {
        "llama": save_hf("llama", root / "llama_bf16_tied"),  # bf16, tied: no lm_head.weight on disk
        "llama_sharded": save_hf("llama", root / "llama_sharded", max_shard_size="40KB"),
        "mixtral": save_hf("mixtral", root / "mixtral"),
        "qwen3_moe": save_hf("qwen3_moe", root / "qwen3_moe"),
    }


def test_bf16_tied_llama_loads_strictly_into_fp32(dirs: dict[str, Path]) -> None:
    d = dirs["llama"]
    assert "lm_head.weight" not in load_file(str(d / "model.safetensors"))
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    model = build("llama", seed=7)
    lm_head = model.lm_head.weight
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(d))  # strict by default
    assert result.missing == [] and result.unexpected == []
    assert model.lm_head.weight is lm_head is model.model.embed_tokens.weight  # the tie survives
    assert model.lm_head.weight.dtype == torch.float32
    ref = reference(d, torch.float32)
    assert torch.equal(logits(model, 256), logits(ref, 256))
    # the tied weight is read once
    assert result.bytes == tensor_bytes(d)


def test_sharded_dir_into_meta_model(dirs: dict[str, Path]) -> None:
    d = dirs["llama_sharded"]
    assert (d / "model.safetensors.index.json").exists()
    model = build("llama", meta=True)
    ckptio.load({"model": ckptio.ModelState(model)}, str(d))
    assert all(not p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.isnan(inv_freq).all()  # not in any checkpoint: the model's business, loudly
    assert reset_non_persistent_buffers(model) == 1
    assert torch.equal(logits(model, 256), logits(reference(d), 256))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_dirs_load_strictly_through_the_conversion_mapping(dirs: dict[str, Path], kind: str) -> None:
    d = dirs[kind]
    stored = load_file(str(d / "model.safetensors"))
    assert any(".experts.3." in k for k in stored) and not any("gate_up_proj" in k for k in stored)
    model = build(kind, seed=11)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(d))
    assert result.missing == [] and result.unexpected == []
    assert result.bytes == tensor_bytes(d)  # every stored byte once, nothing merged in memory
    ref = reference(d)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(logits(model, 128), logits(ref, 128))


def test_moe_into_meta_model_with_conversion_off_reports_the_keys(dirs: dict[str, Path]) -> None:
    model = build("mixtral")
    with pytest.raises(ckptio.StateMismatchError, match="keys differ"):
        ckptio.load({"model": ckptio.ModelState(model)}, str(dirs["mixtral"]), hf_conversion=False)
    r = ckptio.load(
        {"model": ckptio.ModelState(model)}, str(dirs["mixtral"]), hf_conversion=False, strict=False
    )
    assert any("gate_up_proj" in k for k in r.missing)
    assert any("block_sparse_moe.experts.0.w1" in k for k in r.unexpected)


def test_dtype_policy_keep_and_strict(dirs: dict[str, Path]) -> None:
    d = dirs["llama"]
    model = build("llama", seed=3)
    with pytest.raises(ckptio.StateMismatchError, match="dtype_policy='cast'"):
        ckptio.load({"model": ckptio.ModelState(model)}, str(d), dtype_policy="strict")
    ckptio.load({"model": ckptio.ModelState(model)}, str(d), dtype_policy="keep")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = reference(d, torch.bfloat16)
    assert torch.equal(logits(model, 256), logits(ref, 256))
    with pytest.raises(ckptio.OptionError, match="dtype_policy"):
        ckptio.load({"model": ckptio.ModelState(model)}, str(d), dtype_policy="nearest")


def test_keep_on_a_meta_model_allocates_the_stored_dtype(dirs: dict[str, Path]) -> None:
    model = build("qwen3_moe", meta=True)
    ckptio.load({"model": ckptio.ModelState(model)}, str(dirs["qwen3_moe"]), dtype_policy="keep")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reset_non_persistent_buffers(model)
    ref = reference(dirs["qwen3_moe"], torch.bfloat16)
    assert torch.equal(logits(model, 128), logits(ref, 128))


def test_cast_that_overflows_is_an_error_naming_the_tensor(tmp_path: Path) -> None:
    sd = {"w": torch.tensor([1.0, 7.0e4, -2.0]), "b": torch.tensor([3.0, float("inf")])}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    dest = {"w": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(ckptio.StateMismatchError, match=r"'w'.*overflow.*allow_overflow"):
        ckptio.load(dest, str(tmp_path))
    ckptio.load(dest, str(tmp_path), allow_overflow=True)
    assert dest["w"][1] == float("inf") and dest["w"][0] == 1.0
    assert dest["b"][1] == float("inf")  # an infinity that was stored is no overflow
    ints = {"w": torch.zeros(3, dtype=torch.int32), "b": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(ckptio.StateMismatchError, match="only floating dtypes are cast"):
        ckptio.load(ints, str(tmp_path), allow_overflow=True)


def test_large_tensor_is_cast_band_by_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio_safetensors.format as fmt

    monkeypatch.setattr(fmt, "CAST_BAND_BYTES", 1000)  # many bands of a few rows
    src = torch.randn(300, 17, dtype=torch.float64)
    save_file({"x": src.to(torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    dest = {"x": torch.zeros(300, 17)}
    r = ckptio.load(dest, str(tmp_path))
    assert torch.equal(dest["x"], src.to(torch.bfloat16).float()) and r.bytes == 300 * 17 * 2


@pytest.mark.parametrize(
    ("stored", "dest"), [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]
)
def test_narrowing_and_same_width_casts_go_band_by_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: torch.dtype, dest: torch.dtype
) -> None:
    import ckptio_safetensors.format as fmt

    monkeypatch.setattr(fmt, "CAST_BAND_BYTES", 1000)
    src = torch.randn(301, 13, dtype=torch.float64)
    save_file({"x": src.to(stored), "v": src[0].to(stored)}, str(tmp_path / "model.safetensors"))
    out = {"x": torch.zeros(301, 13, dtype=dest), "v": torch.zeros(13, dtype=dest)}
    ckptio.load(out, str(tmp_path))
    assert torch.equal(out["x"], src.to(stored).to(dest)) and torch.equal(
        out["v"], src[0].to(stored).to(dest)
    )


def test_ckptio_checkpoints_refuse_another_dtype_unless_asked(tmp_path: Path) -> None:
    model = build("llama", seed=1)
    ckptio.save({"model": ckptio.ModelState(model)}, str(tmp_path / "native"))
    ckptio.save({"model": ckptio.ModelState(model)}, f"safetensors+file://{tmp_path}/st")
    half = build("llama", seed=2).to(torch.bfloat16)
    for url in (tmp_path / "native", tmp_path / "st"):
        with pytest.raises(ckptio.StateMismatchError, match="does not match"):
            ckptio.load({"model": ckptio.ModelState(half)}, str(url))
    ckptio.load({"model": ckptio.ModelState(half)}, str(tmp_path / "st"), dtype_policy="cast")
    assert torch.equal(half.model.norm.weight, model.model.norm.weight.bfloat16())
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.bfloat16())
    with pytest.raises(ckptio.OptionError, match="dtype_policy"):  # the native format does not cast
        ckptio.load({"model": ckptio.ModelState(half)}, str(tmp_path / "native"), dtype_policy="cast")


def test_key_mapping_that_matches_nothing_is_an_error(dirs: dict[str, Path]) -> None:
    model = build("llama")
    with pytest.raises(ckptio.CheckpointError, match="matches none of"):
        ckptio.load(
            {"model": ckptio.ModelState(model)}, str(dirs["llama"]), key_mapping={r"^decoder\.": "model."}
        )


def test_directory_that_is_neither_lists_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ckptio.CheckpointError) as exc:
        ckptio.load({"model": ckptio.ModelState(build("llama"))}, str(tmp_path))
    msg = str(exc.value)
    assert "neither a ckptio checkpoint nor a Hugging Face directory" in msg
    assert "config.json, notes.txt, pytorch_model.bin" in msg and "pickle" in msg


def test_untied_model_still_needs_its_lm_head(dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    untied = AutoModelForCausalLM.from_config(llama_config(tied=False))
    with pytest.raises(ckptio.StateMismatchError, match="lm_head.weight"):
        ckptio.load({"model": ckptio.ModelState(untied)}, str(dirs["llama"]))


def test_conversion_ops_that_reorder_bytes_read_through_views(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A made-up layout exercising the non-contiguous pieces: ``gate``/``up`` stored side by side
    (split along dim 1 on load) and ``o_proj`` stored transposed."""
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import Chunk, Transpose, WeightConverter

    model = build("llama", seed=5)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    disk = {}
    for k, v in sd.items():
        if k.endswith("mlp.gate_proj.weight"):
            up = sd[k.replace("gate_proj", "up_proj")]
            disk[k.replace("gate_proj.weight", "gate_up_side.weight")] = torch.cat([v, up], dim=1)
        elif k.endswith("mlp.up_proj.weight"):
            continue
        elif k.endswith("self_attn.o_proj.weight"):
            disk[k.replace("o_proj.weight", "o_t.weight")] = v.t().contiguous()
        else:
            disk[k] = v
    save_file(disk, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    conversions = [
        WeightConverter(
            "mlp.gate_up_side.weight",
            ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
            operations=[Chunk(dim=1)],
        ),
        WeightConverter("self_attn.o_t.weight", "self_attn.o_proj.weight", operations=[Transpose(0, 1)]),
    ]
    monkeypatch.setattr(cm, "get_model_conversion_mapping", lambda model, **kw: list(conversions))
    fresh = build("llama", seed=6)
    r = ckptio.load({"model": ckptio.ModelState(fresh)}, str(tmp_path), thread_count=1)
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    # a box that is not one run of bytes costs the whole stored rows it spans: gate and up each
    # read their rows of ``gate_up_side`` in full; everything else is read once
    side = sum(t.numel() * t.element_size() for k, t in disk.items() if "gate_up_side" in k)
    assert r.bytes == sum(t.numel() * t.element_size() for t in disk.values()) + side


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_meta_fsdp2_on_two_ranks_reads_each_rank_its_share(dirs: dict[str, Path], kind: str) -> None:
    d = dirs[kind]
    total = tensor_bytes(d)
    results = run_ranks(load_meta_fsdp, 2, args=(kind, str(d)))
    assert results[0]["state_equal"] and results[0]["logits_equal"]
    for r in results:
        assert r["missing"] == [] and r["unexpected"] == []
        assert r["tied"] == (kind == "llama")
        # tensor bytes by ranged reads: about half each; headers and the index come by read_bytes
        assert r["read_into"] == r["result_bytes"] < 0.6 * total, (r, total)
        assert r["read_bytes"] < 64 << 10
    assert sum(r["read_into"] for r in results) == total  # together: everything, once


def test_materialize_keeps_real_tensors_and_ties() -> None:
    from ckptio_safetensors import materialize

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("scale", torch.full((4,), 3.0))
            self.register_buffer("cache", torch.ones(2), persistent=False)

    with torch.device("meta"):
        net = Net()
    net.scale = torch.full((4,), 3.0)  # a real persistent buffer next to meta parameters
    assert materialize(net) and not materialize(net)  # nothing left on meta the second time
    assert net.head.weight is net.emb.weight and not net.emb.weight.is_meta
    assert torch.equal(net.scale, torch.full((4,), 3.0))
    assert torch.isnan(net.cache).all()  # a non-persistent meta buffer: NaN until the model resets it


def test_ckptio_safetensors_checkpoint_into_a_meta_model(tmp_path: Path) -> None:
    """The same preparation serves ckptio's own safetensors checkpoints (a resume into a model
    built on the meta device); the native format still asks for a materialised model."""
    model = build("mixtral", seed=12)
    ckptio.save({"model": ckptio.ModelState(model)}, f"safetensors+file://{tmp_path}/st")
    ckptio.save({"model": ckptio.ModelState(model)}, str(tmp_path / "native"))
    lazy = build("mixtral", meta=True)
    ckptio.load({"model": ckptio.ModelState(lazy)}, str(tmp_path / "st"))
    reset_non_persistent_buffers(lazy)
    assert torch.equal(logits(lazy, 128), logits(model, 128))
    with pytest.raises(ckptio.StateMismatchError, match="meta device"):
        ckptio.load({"model": ckptio.ModelState(build("mixtral", meta=True))}, str(tmp_path / "native"))
