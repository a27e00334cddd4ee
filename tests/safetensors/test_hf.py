"""HF interop: foreign ``save_pretrained`` directories, consolidation options, the HF writer, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ckptio
import ckptio_safetensors
import pytest
import torch
from ckptio.checkpoint import open_backend
from safetensors.torch import load_file, save_file

from ._models import build_llama


def _merged(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved by transformers: one file, and sharded with an index."""
    root = tmp_path_factory.mktemp("hf")
    model = build_llama(3, shard=False)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root / "single", root / "sharded", {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_save_pretrained_dir_loads_into_model_state(pretrained: tuple, which: str) -> None:
    single, sharded, ref = pretrained
    d = single if which == "single" else sharded
    assert (d / "model.safetensors.index.json").exists() == (which == "sharded")
    model = build_llama(4, shard=False)
    result = ckptio.load({"model": ckptio.ModelState(model)}, str(d))  # detected: no manifest
    assert result.manifest is None
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_save_pretrained_dir_loads_into_flat_dict_with_key_mapping(pretrained: tuple) -> None:
    single, _, ref = pretrained
    flat = {k.replace("model.", "backbone.", 1): torch.zeros_like(v) for k, v in ref.items()}
    ckptio.load(flat, str(single), key_mapping={r"^model\.": "backbone.", r"^nothing": "x"})
    assert all(torch.equal(flat[k.replace("model.", "backbone.", 1)], v) for k, v in ref.items())
    plain = {k: torch.zeros_like(v) for k, v in ref.items()}
    ckptio.load(plain, f"safetensors+file://{single}")
    assert all(torch.equal(plain[k], v) for k, v in ref.items())


def test_consolidate_keeps_every_dtype_and_casts_only_floats(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    src = {
        "f32": torch.randn(40, 8, generator=g),
        "bf16": torch.randn(8, 8, generator=g).bfloat16(),
        "i64": torch.arange(64, dtype=torch.int64) * 3_000_000_000,
        "mask": torch.rand(5, 7, generator=g) > 0.5,
        "fp8": torch.randn(16, 4, generator=g).to(torch.float8_e4m3fn),
        "u8": torch.arange(200, dtype=torch.uint8),
    }
    ckptio.save({"model": dict(src), "step": 1}, f"safetensors+file://{tmp_path}/ck")
    out = tmp_path / "hf"
    index = ckptio_safetensors.consolidate(str(tmp_path / "ck"), str(out), progress=False)
    merged = _merged(out)
    assert merged.keys() == src.keys()
    assert all(merged[k].dtype == v.dtype and torch.equal(_bits(merged[k]), _bits(v)) for k, v in src.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in src.values())
    with open(out / "model-00001-of-00001.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt"}

    cast = tmp_path / "cast"
    ckptio_safetensors.consolidate(str(tmp_path / "ck"), str(cast), cast_dtype="fp16", progress=False)
    c = _merged(cast)
    assert c["f32"].dtype == torch.float16 and c["bf16"].dtype == torch.float16
    assert (
        c["i64"].dtype == torch.int64
        and c["mask"].dtype == torch.bool
        and c["fp8"].dtype == torch.float8_e4m3fn
    )
    assert torch.equal(c["f32"], src["f32"].half())


def test_consolidate_restores_reference_dtypes_and_layout(tmp_path: Path) -> None:
    src = {f"layer{i}.w": torch.randn(16, 16) for i in range(4)} | {"norm": torch.randn(16)}
    ckptio.save({"model": dict(src)}, f"safetensors+file://{tmp_path}/ck")
    base = tmp_path / "base"
    base.mkdir()
    ref_tensors = {k: (v.bfloat16() if k != "norm" else v) for k, v in src.items()}
    save_file(
        {k: ref_tensors[k] for k in ("layer0.w", "layer1.w")}, str(base / "model-00001-of-00002.safetensors")
    )
    save_file(
        {k: ref_tensors[k] for k in ("layer2.w", "layer3.w", "norm")},
        str(base / "model-00002-of-00002.safetensors"),
    )
    weight_map = {
        k: f"model-0000{1 if k in ('layer0.w', 'layer1.w') else 2}-of-00002.safetensors" for k in src
    }
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = tmp_path / "hf"
    index = ckptio_safetensors.consolidate(
        str(tmp_path / "ck"),
        str(out),
        reference_index=str(base / "model.safetensors.index.json"),
        dtype_reference=str(base),
        cast_dtype="fp16",
        workers=2,
        progress=False,
    )
    assert index["weight_map"] == weight_map
    merged = _merged(out)
    assert (
        merged["layer0.w"].dtype == torch.bfloat16 and merged["norm"].dtype == torch.float32
    )  # kept as in base
    assert torch.equal(merged["layer3.w"], src["layer3.w"].bfloat16())


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _beside(d: Path) -> list[str]:
    """Staging, moved-aside and lease entries next to ``d``."""
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def test_consolidate_native_source_and_replaces_destination_only_when_told(tmp_path: Path) -> None:
    """Finding 4: consolidate deleted the ``model*.safetensors`` of any existing destination and had
    no overwrite flag; now a non-empty destination is refused untouched, or replaced whole."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    ckptio.save({"model": ckptio.ModelState(model), "optim_step": 5}, str(tmp_path / "native"))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    (out / "other.safetensors").write_bytes(b"unrelated")
    (out / "config.json").write_text("{}")
    before = _files(out)
    with pytest.raises(ckptio.CheckpointError, match="overwrite"):
        ckptio_safetensors.consolidate(str(tmp_path / "native"), str(out), progress=False)
    assert _files(out) == before and _beside(out) == []
    ckptio_safetensors.consolidate(str(tmp_path / "native"), str(out), progress=False, overwrite=True)
    assert sorted(_files(out)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    merged = _merged(out)
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert _beside(out) == []
    # an empty directory is not "something else": no flag needed
    (tmp_path / "empty").mkdir()
    ckptio_safetensors.consolidate(str(tmp_path / "native"), str(tmp_path / "empty"), progress=False)
    assert (tmp_path / "empty" / "model.safetensors.index.json").exists()


def test_consolidate_requires_checksums_unless_verify_is_off(tmp_path: Path) -> None:
    """A null checksum is corruption; ``verify=False`` is the explicit opt-out, as for ``load``."""
    from ..reliability._ckpt import read_manifest_json, write_signed_manifest

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    src = tmp_path / "native"
    ckptio.save({"model": ckptio.ModelState(model)}, str(src))
    body = read_manifest_json(src)
    for entry in body["format_metadata"]["storage"]:
        entry["xxh3"] = None
    write_signed_manifest(src, body)
    with pytest.raises(ckptio.CorruptCheckpointError, match="checksum"):
        ckptio_safetensors.consolidate(str(src), str(tmp_path / "hf"), progress=False)
    ckptio_safetensors.consolidate(str(src), str(tmp_path / "hf"), progress=False, verify=False)
    merged = _merged(tmp_path / "hf")
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_reconsolidation_replaces_an_export_in_one_rename(tmp_path: Path) -> None:
    """A second export with another shard layout replaces the first whole: no shard of the old
    layout survives beside the new index (the mix that SIGKILL or a smaller model used to leave)."""
    state = {"model": {f"w{i}": torch.full((64, 64), float(i)) for i in range(6)}}
    ckptio.save(state, str(tmp_path / "ck"))
    out = tmp_path / "hf"
    ckptio_safetensors.consolidate(str(tmp_path / "ck"), str(out), max_shard_size="20KB", progress=False)
    first = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(first) > 2
    ckptio_safetensors.consolidate(str(tmp_path / "ck"), str(out), progress=False, overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert _beside(out) == []


@pytest.mark.parametrize("new_copy_complete", [True, False])
def test_interrupted_reconsolidation_rolls_forward_or_back(tmp_path: Path, new_copy_complete: bool) -> None:
    """The state SIGKILL leaves between the two renames of a replacement (old export moved aside,
    new one staged, its writer dead): the next touch of the URL puts a whole export back."""
    import socket
    import subprocess
    import sys

    ckptio.save({"model": {"w": torch.full((8,), 1.0)}}, str(tmp_path / "one"))
    ckptio.save({"model": {"w": torch.full((8,), 2.0)}}, str(tmp_path / "two"))
    out = tmp_path / "hf"
    ckptio_safetensors.consolidate(str(tmp_path / "one"), str(out), progress=False)
    ckptio_safetensors.consolidate(str(tmp_path / "two"), str(tmp_path / "staged"), progress=False)
    if not new_copy_complete:
        (tmp_path / "staged" / "model.safetensors.index.json").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    token = "00112233aabb"
    out.rename(tmp_path / f".hf.{token}.ckptio-old")
    (tmp_path / "staged").rename(tmp_path / f".hf.{token}.ckptio-partial")
    (tmp_path / f".hf.{token}.ckptio-lease").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": 0, "token": token})
    )
    got = {"w": torch.zeros(8)}
    ckptio.load(got, str(out))  # the next touch
    assert torch.equal(got["w"], torch.full((8,), 2.0 if new_copy_complete else 1.0))
    assert _beside(out) == []


def test_failed_consolidation_publishes_nothing(tmp_path: Path) -> None:
    ckptio.save({"model": {"w": torch.arange(1000.0)}}, f"safetensors+file://{tmp_path}/ck")
    f = next((tmp_path / "ck" / "model").glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[-8] ^= 0x55
    f.write_bytes(bytes(raw))
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio_safetensors.consolidate(str(tmp_path / "ck"), str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".*partial"))


def test_write_hf_checkpoint_shards_and_index(tmp_path: Path) -> None:
    sd = {f"t{i}": torch.full((100,), float(i)) for i in range(5)} | {"ids": torch.arange(10)}
    _, backend = open_backend(str(tmp_path))
    index = ckptio_safetensors.write_hf_checkpoint(
        sd,
        backend,
        str(tmp_path / "out"),
        max_shard_size=500,
        dtypes={"t0": torch.bfloat16},
        cast_dtype="fp16",
    )
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    merged = _merged(tmp_path / "out")
    assert merged["t0"].dtype == torch.bfloat16 and merged["t1"].dtype == torch.float16
    assert merged["ids"].dtype == torch.int64 and torch.equal(merged["ids"], sd["ids"])
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text()) == index


def test_cli_consolidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptio_safetensors.cli import add_consolidate_arguments, run_consolidate

    ckptio.save({"model": {"a": torch.ones(3, 3), "b": torch.zeros(2)}}, f"safetensors+file://{tmp_path}/ck")
    parser = argparse.ArgumentParser()
    add_consolidate_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path / "ck"),
            str(tmp_path / "hf"),
            "--dtype",
            "bf16",
            "--json",
            "--shard-size",
            "1MB",
            "--workers",
            "2",
        ]
    )
    assert run_consolidate(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == 2 and report["files"] == ["model-00001-of-00001.safetensors"]
    assert _merged(tmp_path / "hf")["a"].dtype == torch.bfloat16
    bad = parser.parse_args([str(tmp_path / "nope"), str(tmp_path / "hf2")])
    assert run_consolidate(bad) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_ring_hands_out_fifo_and_wraps() -> None:
    from ckptio_safetensors.consolidation import _Ring

    ring = _Ring(100)
    a, b = ring.take(60), ring.take(30)
    assert a is not None and b is not None and ring.take(20) is None  # 10 left at the end
    ring.give_back(25)  # part of ``a`` written: its first 25 bytes are free again
    assert ring.take(30) is None and ring.take(20) is not None  # wraps to the start
    ring.give_back(35)  # rest of ``a``
    assert ring.take(45) is None  # the hole before ``b`` is 40 bytes
    ring.give_back(30)  # ``b``
    ring.give_back(20)
    assert not ring.live and ring.take(100) is not None and ring.take(1) is None


@pytest.mark.parametrize("inflight", [4096, 50_000])
def test_consolidate_with_a_small_arena_is_exact(tmp_path: Path, inflight: int) -> None:
    """Tensors larger than the arena go alone; smaller ones wrap around it; bytes never mix."""
    g = torch.Generator().manual_seed(3)
    state = {f"w{i}": torch.randn(17 + 13 * i, 31, generator=g) for i in range(12)}
    state["big"] = torch.randn(300, 100, generator=g)  # 120 kB, larger than either arena
    state["ids"] = torch.arange(5000, dtype=torch.int64)
    ckptio.save(state, f"safetensors+file://{tmp_path / 'src'}")
    ckptio_safetensors.consolidate(
        str(tmp_path / "src"), str(tmp_path / "hf"), workers=3, max_inflight_bytes=inflight, progress=False
    )
    merged = _merged(tmp_path / "hf")
    assert merged.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(_bits(merged[k]), _bits(v)), k
