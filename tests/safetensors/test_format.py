"""Single-process behaviour of the safetensors format: layout, dtypes, values, checksums, loads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio.errors import CorruptCheckpointError, StateMismatchError
from safetensors import safe_open
from safetensors.torch import load_file


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, generator=g)
    return {
        "f32": f,
        "f64": f.double(),
        "f16": f.half(),
        "bf16": f.bfloat16(),
        "fp8_e4m3": f.to(torch.float8_e4m3fn),
        "fp8_e5m2": f.to(torch.float8_e5m2),
        "i64": torch.arange(-10, 20, dtype=torch.int64).reshape(6, 5) * (1 << 40),
        "i32": torch.arange(30, dtype=torch.int32),
        "i16": torch.arange(30, dtype=torch.int16),
        "i8": torch.arange(-15, 15, dtype=torch.int8),
        "u8": torch.arange(30, dtype=torch.uint8),
        "bool": f > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality for every dtype (fp8 has no ``==``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return (
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True
    )


def test_flat_state_round_trips_every_dtype(tmp_path: Path) -> None:
    src = _all_dtypes()
    ckptio.save(dict(src), f"safetensors+file://{tmp_path}/ck")
    files = sorted((tmp_path / "ck").glob("*.safetensors"))
    assert [f.name for f in files] == ["rank00000-00.safetensors"]  # a flat dict is stored as is
    on_disk = load_file(str(files[0]))
    assert on_disk.keys() == src.keys() and all(_same(on_disk[k], src[k]) for k in src)
    # the whole-tensor group is a plain HF directory too
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"rank00000-00.safetensors"}
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    ckptio.load(dst, str(tmp_path / "ck"))
    assert all(_same(dst[k], src[k]) for k in src)


def test_header_follows_the_safetensors_rules(tmp_path: Path) -> None:
    src = _all_dtypes()
    ckptio.save(dict(src), f"safetensors+file://{tmp_path}/ck")
    raw = (tmp_path / "ck" / "rank00000-00.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == "pt"
    sharding = json.loads(meta["ckptio_sharding"])
    assert sharding["i64"] == {"global_shape": [6, 5], "offsets": [0, 0]}
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw)
    codes = {k: v["dtype"] for k, v in header.items()}
    assert codes["fp8_e4m3"] == "F8_E4M3" and codes["bool"] == "BOOL" and codes["bf16"] == "BF16"
    assert codes["i64"] == "I64" and codes["u8"] == "U8"
    for k, v in header.items():  # every tensor is aligned to its element size (zero-copy mmap)
        assert v["data_offsets"][0] % src[k].element_size() == 0


def test_nested_state_uses_one_directory_per_entry(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    state = {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, opt),
        "step": 3,
        "cfg": {"lr": 0.1, "name": "run", "betas": (0.9, 0.99)},
    }
    ckptio.save(state, f"safetensors+file://{tmp_path}/ck")
    ck = tmp_path / "ck"
    with safe_open(str(ck / "model" / "rank00000-00.safetensors"), "pt") as f:
        assert set(f.keys()) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the model's own FQNs
    hf_index = json.loads((ck / "model" / "model.safetensors.index.json").read_text())
    assert set(hf_index["weight_map"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    optim_names = load_file(str(ck / "optim" / "rank00000-00.safetensors")).keys()
    assert "optim.state.0.weight.exp_avg" in optim_names
    values = json.loads((ck / "values-rank00000.json").read_text())
    assert values["step"] == 3 and values["cfg.lr"] == 0.1

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt2 = torch.optim.AdamW(model2.parameters())
    state2 = {
        "model": ckptio.ModelState(model2),
        "optim": ckptio.OptimizerState(model2, opt2),
        "step": 0,
        "cfg": {"lr": 0.0, "name": "", "betas": (0.0, 0.0)},
    }
    ckptio.load(state2, str(ck))
    assert state2["step"] == 3 and state2["cfg"] == {"lr": 0.1, "name": "run", "betas": (0.9, 0.99)}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_checksums_catch_damage_and_verify_false_skips(tmp_path: Path) -> None:
    src = {"w": torch.arange(1000, dtype=torch.float32), "v": torch.ones(10)}
    url = f"safetensors+file://{tmp_path}/ck"
    ckptio.save(dict(src), url)
    assert ckptio.verify(url) >= 4040
    f = tmp_path / "ck" / "rank00000-00.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0xFF  # inside "w" (sorted last of the two F32 tensors: "v" < "w")
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        ckptio.verify(url)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        ckptio.load(dst, url)
    ckptio.load(dst, url, verify=False)
    assert torch.equal(dst["v"], src["v"]) and not torch.equal(dst["w"], src["w"])


def test_partial_load_reads_only_what_it_needs(tmp_path: Path) -> None:
    src = {"a": torch.randn(256, 256), "b": torch.randn(16)}
    ckptio.save(dict(src), f"safetensors+file://{tmp_path}/ck")
    dst = {"b": torch.zeros(16)}
    result = ckptio.load(dst, str(tmp_path / "ck"), strict=False)
    assert torch.equal(dst["b"], src["b"]) and result.unexpected == ["a"]
    assert result.bytes == 64


def test_band_reads_when_resharding_without_verification(tmp_path: Path) -> None:
    import ckptio_safetensors.format as fmt
    from ckptio.checkpoint import open_backend, read_manifest
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    t = torch.randn(64, 8, 4)
    ckptio.save({"t": t}, f"safetensors+file://{tmp_path}/ck")
    u, backend = open_backend(str(tmp_path / "ck"))
    md, chunks = fmt.manifest_metadata(read_manifest(backend, u.path), "test")
    reader = fmt.SafetensorsReader(backend, u.path, md, chunks, verify=False)

    class Planner:
        out = torch.zeros(10, 8, 2)

        def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
            return self.out

        def commit_tensor(self, req: ReadItem, dst: torch.Tensor) -> None:
            pass

    req = ReadItem(
        LoadItemType.TENSOR,
        MetadataIndex("t", [0, 0, 0]),
        torch.Size([0, 0, 0]),
        MetadataIndex("t", [0, 0, 0]),
        torch.Size([20, 0, 1]),
        torch.Size([10, 8, 2]),
    )
    planner = Planner()
    reader._read(req, reader._chunk(req), planner.resolve_tensor(req))
    assert torch.equal(planner.out, t[20:30, :, 1:3])
    assert reader.bytes_read == 10 * 8 * 4 * 4  # only the band of rows


def test_unsupported_dtype_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ckptio.CheckpointError, match="safetensors cannot store"):
        ckptio.save({"c": torch.zeros(2, dtype=torch.complex128)}, f"safetensors+file://{tmp_path}/ck")
    assert not (tmp_path / "ck").exists()


def test_mismatched_state_is_reported(tmp_path: Path) -> None:
    ckptio.save({"w": torch.zeros(3)}, f"safetensors+file://{tmp_path}/ck")
    with pytest.raises(StateMismatchError):
        ckptio.load({"w": torch.zeros(4)}, str(tmp_path / "ck"))


def test_memory_backend_when_available() -> None:
    from ckptio.checkpoint import open_backend

    try:
        open_backend("memory://ckptio-st-test/x")
    except ckptio.PluginError:
        pytest.skip("no fsspec backend installed (ckptio-fsspec)")
    src = {"w": torch.randn(33, 7), "i": torch.arange(5)}
    url = "safetensors+memory://ckptio-st-test/ck"
    ckptio.save(dict(src), url)
    assert ckptio.manifest(url).format == "safetensors"
    assert ckptio.verify(url) > 0
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    ckptio.load(dst, url)
    assert all(torch.equal(dst[k], src[k]) for k in src)


def test_interrupted_save_is_not_taken_for_a_foreign_checkpoint(tmp_path: Path) -> None:
    ckptio.save({"w": torch.ones(4)}, f"safetensors+file://{tmp_path}/ck")
    (tmp_path / "ck" / "manifest.json").unlink()  # as an object-store save cut before its commit
    with pytest.raises(ckptio.IncompleteCheckpointError):
        ckptio.load({"w": torch.zeros(4)}, str(tmp_path / "ck"))
