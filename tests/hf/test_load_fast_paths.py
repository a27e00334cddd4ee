"""The fast paths of loading into a fresh fp32 model: a large widening read split into bands of
rows on several reader threads, and the fresh model memory populated in the background
(``modelinit.prefault``). The test models are tiny: the thresholds are lowered so that every
tensor takes these paths; results must be bit-identical to ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio_safetensors import reset_non_persistent_buffers
from safetensors.torch import save_file

from tests.e2e._ranks import run_ranks

from ._models import build, load_meta_fsdp, logits, reference, save_hf, tensor_bytes


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio_safetensors.format as fmt
    import ckptio_safetensors.modelinit as mi

    monkeypatch.setattr(fmt, "SPLIT_BYTES", 512)
    monkeypatch.setattr(mi, "PREFAULT_MIN_BYTES", 1)
    monkeypatch.setattr(mi, "_PREFAULT_PIECE", 4096)


@pytest.mark.parametrize("rows", [300, 7, 1])
def test_widening_split_into_bands_is_exact(
    tmp_path: Path, small_thresholds: None, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    import ckptio_safetensors.format as fmt

    monkeypatch.setattr(fmt, "CAST_BAND_BYTES", 1000)  # several read-and-cast bands within a task
    src = torch.randn(rows, 37, dtype=torch.float64)
    save_file(
        {"x": src.to(torch.bfloat16), "y": src[0].to(torch.float16)}, str(tmp_path / "model.safetensors")
    )
    seen: list[Any] = []
    orig = fmt.SafetensorsReader._read

    def spy(self: Any, req: Any, c: Any, dst: Any, part: Any = None) -> Any:
        seen.append((c.fqn, part))
        return orig(self, req, c, dst, part)

    monkeypatch.setattr(fmt.SafetensorsReader, "_read", spy)
    out = {"x": torch.full((rows, 37), float("nan")), "y": torch.zeros(37)}
    r = ckptio.load(out, str(tmp_path), thread_count=3)
    assert torch.equal(out["x"], src.to(torch.bfloat16).float())
    assert torch.equal(out["y"], src[0].to(torch.float16).float())
    assert r.bytes == rows * 37 * 2 + 37 * 2
    parts = sorted(p for f, p in seen if f == "x" and p is not None)
    if rows >= 2 * (512 // (37 * 4) or 1):
        assert len(parts) > 1 and parts[0][0] == 0 and sum(n for _, n in parts) == rows
        assert all(a[0] + a[1] == b[0] for a, b in zip(parts, parts[1:]))
    # one reader thread: never split
    seen.clear()
    ckptio.load(out, str(tmp_path), thread_count=1)
    assert all(p is None for _, p in seen)


def test_meta_llama_with_prefault_and_bands_matches_from_pretrained(
    tmp_path: Path, small_thresholds: None
) -> None:
    d = save_hf("llama", tmp_path / "llama", max_shard_size="40KB")
    model = build("llama", meta=True)
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(d), thread_count=4)
    assert result.missing == [] and result.unexpected == []
    reset_non_persistent_buffers(model)
    ref = reference(d)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(logits(model, model.config.vocab_size), logits(ref, model.config.vocab_size))


def test_prefault_never_changes_memory() -> None:
    from ckptio_safetensors.modelinit import prefault

    written = torch.arange(3 << 20, dtype=torch.float32)  # already holds data
    fresh = torch.empty(5 << 20, dtype=torch.float32)
    tiny = torch.empty(10)  # below the threshold: left alone
    waiter = prefault([written, fresh, tiny], threads=2)
    fresh.fill_(2.0)  # racing with the workers is fine: populating maps pages, never writes them
    if waiter is not None:
        waiter.join(timeout=60)
        assert not waiter.is_alive()
    assert torch.equal(written, torch.arange(3 << 20, dtype=torch.float32))
    assert bool((fresh == 2.0).all())
    assert prefault([tiny]) is None


def _fsdp_with_small_thresholds(rank: int, world: int, kind: str, hf_dir: str) -> dict[str, Any]:
    import ckptio_safetensors.format as fmt
    import ckptio_safetensors.modelinit as mi

    fmt.SPLIT_BYTES = 256
    mi.PREFAULT_MIN_BYTES = 1
    return load_meta_fsdp(rank, world, kind, hf_dir)


@pytest.mark.multirank
@pytest.mark.slow
def test_meta_fsdp2_bands_still_read_each_rank_its_share(tmp_path: Path) -> None:
    d = save_hf("llama", tmp_path / "llama")
    total = tensor_bytes(d)
    results = run_ranks(_fsdp_with_small_thresholds, 2, args=("llama", str(d)))
    assert results[0]["state_equal"] and results[0]["logits_equal"]
    for r in results:
        assert r["missing"] == [] and r["unexpected"] == []
        assert r["read_into"] == r["result_bytes"] < 0.6 * total, (r, total)
    assert sum(r["read_into"] for r in results) == total


def test_names_already_the_models_skip_transformers_conversion_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.conversion_mapping as cm

    llama = save_hf("llama", tmp_path / "llama")  # save_pretrained uses the mapping itself
    mixtral = save_hf("mixtral", tmp_path / "mixtral")
    calls: list[str] = []
    orig = cm.get_model_conversion_mapping

    def counting(model: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(model).__name__)
        return orig(model, *args, **kwargs)

    monkeypatch.setattr(cm, "get_model_conversion_mapping", counting)
    model = build("llama", meta=True)
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(llama))
    assert result.missing == [] and result.unexpected == [] and calls == []
    reset_non_persistent_buffers(model)
    assert torch.equal(
        logits(model, model.config.vocab_size), logits(reference(llama), model.config.vocab_size)
    )
    # per-expert tensors on disk, fused in memory: the mapping is needed, and used
    calls.clear()
    model = build("mixtral", meta=True)
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(mixtral))
    assert result.missing == [] and result.unexpected == [] and calls
