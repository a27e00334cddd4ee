"""The native format through ``ckptio.save``/``ckptio.load``: values, errors, checksums."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.manifest import MANIFEST_NAME

DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def _bits(t: torch.Tensor) -> bytes:
    """Bit pattern (exact compare, NaN included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _roundtrip(state: dict[str, Any], dest: dict[str, Any], path: Path, **load_kw: Any) -> ckptio.LoadResult:
    ckptio.save(state, str(path))
    return ckptio.load(dest, str(path), **load_kw)


def test_dtypes_roundtrip_bit_exact(tmp_path: Path) -> None:
    state = {str(dt).removeprefix("torch."): _sample(dt) for dt in DTYPES}
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    _roundtrip(state, dest, tmp_path / "ck")
    for k, v in state.items():
        assert dest[k].dtype == v.dtype and dest[k].shape == v.shape, k
        assert _bits(dest[k]) == _bits(v), k
    stored = {
        e.name: e.dtype
        for e in ckptio.plugins.get_format("native").tensors(
            _backend(), str(tmp_path / "ck"), ckptio.manifest(str(tmp_path / "ck"))
        )
    }
    assert stored["bfloat16"] == "bfloat16" and stored["float8_e4m3fn"] == "float8_e4m3fn"


def _backend() -> ckptio.Backend:
    from ckptio_local import LocalBackend

    return LocalBackend()


def test_zero_dim_empty_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "scalar": torch.tensor(3.5),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "empty3": torch.empty(2, 0, 3, dtype=torch.bfloat16),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "expanded": torch.arange(3.0).expand(4, 3),
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    dest = {k: torch.full_like(v.contiguous(), -1) for k, v in state.items()}
    dest["into_noncontig"] = torch.zeros(6, 4).t()  # a non-contiguous destination
    state["into_noncontig"] = torch.arange(24.0).reshape(4, 6)
    _roundtrip(state, dest, tmp_path / "ck")
    for k, v in state.items():
        assert torch.equal(dest[k], v), k


def test_nested_containers_and_json_values(tmp_path: Path) -> None:
    state = {
        "model": {"layers": [{"w": torch.ones(2, 2)}, {"w": torch.full((2, 2), 2.0)}], "cfg": {"depth": 2}},
        "step": 10,
        "lr": 3e-4,
        "name": "run-ü",
        "flag": True,
        "nothing": None,
        "pair": (1, "a", (2.5, None)),
        "inf": math.inf,
        "ninf": -math.inf,
        "nan": math.nan,
        "raw": b"\x00\x01\xffbytes",
        # tuples are single values to DCP (dicts and lists are flattened into keys)
        "int_keys": ({1: "a", 2: "b"},),
        "tagged": ({"__ckptio__": "looks like a tag", "v": [1]},),
        "list": [1, "two", [3.0]],
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "big": 2**62,
    }
    dest: dict[str, Any] = {k: None for k in state}
    dest["model"] = {"layers": [{"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 2)}], "cfg": {"depth": 0}}
    dest["list"] = [None, None, [None]]  # the destination mirrors the structure of dicts and lists
    _roundtrip(state, dest, tmp_path / "ck")
    assert torch.equal(dest["model"]["layers"][1]["w"], torch.full((2, 2), 2.0))
    assert dest["model"]["cfg"] == {"depth": 2}
    for k in (
        "step",
        "lr",
        "name",
        "flag",
        "nothing",
        "pair",
        "inf",
        "ninf",
        "raw",
        "int_keys",
        "tagged",
        "size",
        "dtype",
        "big",
        "list",
    ):
        assert dest[k] == state[k] and type(dest[k]) is type(state[k]), k
    assert math.isnan(dest["nan"])


def test_tensor_into_plain_destination(tmp_path: Path) -> None:
    """A tensor stored where the state holds ``None`` is loaded as a fresh tensor."""
    ckptio.save({"t": torch.arange(4, dtype=torch.int16)}, str(tmp_path / "ck"))
    dest: dict[str, Any] = {"t": None}
    ckptio.load(dest, str(tmp_path / "ck"))
    assert torch.equal(dest["t"], torch.arange(4, dtype=torch.int16))


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value, where",
    [(_Opaque(), "bad"), ({"deep": [1, {"x": {1, 2}}]}, "bad"), ({"t": ("x", torch.ones(1))}, "bad")],
)
def test_non_json_values_are_refused_at_save(tmp_path: Path, value: Any, where: str) -> None:
    with pytest.raises(ckptio.StateMismatchError, match=r"bad|tensor nested") as info:
        ckptio.save({"ok": torch.ones(1), "bad": value}, str(tmp_path / "ck"))
    assert "pickle" not in str(info.value).lower() or "not a tensor" in str(info.value)
    assert not (tmp_path / "ck").exists(), "a refused save must not leave a checkpoint"


def test_strict_and_non_strict_loads(tmp_path: Path) -> None:
    ckptio.save({"a": torch.ones(2), "b": torch.ones(2), "n": 1}, str(tmp_path / "ck"))
    dest = {"a": torch.zeros(2), "c": torch.zeros(2)}
    with pytest.raises(ckptio.StateMismatchError) as info:
        ckptio.load(dest, str(tmp_path / "ck"))
    assert info.value.missing == ["c"] and info.value.unexpected == ["b", "n"]
    assert "strict=False" in str(info.value)
    assert torch.equal(dest["a"], torch.zeros(2)), "a refused load must not touch the state"
    res = ckptio.load(dest, str(tmp_path / "ck"), strict=False)
    assert res.missing == ["c"] and res.unexpected == ["b", "n"]
    assert torch.equal(dest["a"], torch.ones(2)) and torch.equal(dest["c"], torch.zeros(2))


def test_shape_and_dtype_mismatch_lists_every_key(tmp_path: Path) -> None:
    ckptio.save(
        {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1), "s": "x"}, str(tmp_path / "ck")
    )
    dest = {
        "a": torch.zeros(3, 2),
        "b": torch.zeros(4, dtype=torch.float16),
        "c": torch.zeros(1),
        "s": torch.ones(1),
    }
    with pytest.raises(ckptio.StateMismatchError) as info:
        ckptio.load(dest, str(tmp_path / "ck"), strict=False)
    assert info.value.mismatched == ["a", "b", "s"]
    msg = str(info.value)
    assert "a: checkpoint torch.float32[2, 3] vs state torch.float32[3, 2]" in msg
    assert "torch.float16" in msg and "s: stored as a non-tensor value" in msg


def test_manifest_and_verify(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64), "b": torch.randn(64), "step": 3}
    res = ckptio.save(state, str(tmp_path / "ck"), metadata={"run": "abc"})
    m = ckptio.manifest(str(tmp_path / "ck"))
    assert m.format == "native" and m.user == {"run": "abc"} and m.world_size == 1
    assert res.bytes == m.total_bytes == sum((tmp_path / "ck" / f).stat().st_size for f in m.files)
    checked = ckptio.verify(str(tmp_path / "ck"))
    assert checked >= (64 * 64 + 64) * 4
    body = json.loads((tmp_path / "ck" / MANIFEST_NAME).read_text())
    assert body["checksum"].startswith("xxh3_64:")


def _flip_data_byte(ck: Path) -> Path:
    data_files = sorted(p for p in ck.iterdir() if p.suffix == ".bin" and p.stat().st_size)
    victim = data_files[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    return victim


def test_flipped_byte_is_detected_and_names_the_file(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.randn(256, 16)}, str(ck), thread_count=1)
    victim = _flip_data_byte(ck)
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.verify(str(ck))
    assert str(victim) in str(info.value) and info.value.path == str(victim)
    dest = {"w": torch.zeros(256, 16)}
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.load(dest, str(ck))
    assert str(victim) in str(info.value)
    # verify=False skips the checksums: the load succeeds with the damaged value
    ckptio.load(dest, str(ck), verify=False)
    assert dest["w"].abs().sum() > 0


def test_damaged_manifest_is_corrupt(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.ones(3)}, str(ck))
    path = ck / MANIFEST_NAME
    path.write_text(path.read_text().replace('"world_size":1', '"world_size":2'))
    with pytest.raises(ckptio.CorruptCheckpointError, match="manifest checksum mismatch"):
        ckptio.load({"w": torch.zeros(3)}, str(ck))


def test_missing_and_uncommitted_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ckptio.CheckpointNotFoundError, match="no checkpoint"):
        ckptio.load({"w": torch.zeros(1)}, str(tmp_path / "nothing"))
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.ones(3)}, str(ck))
    (ck / MANIFEST_NAME).unlink()
    with pytest.raises(ckptio.IncompleteCheckpointError, match="did not finish"):
        ckptio.load({"w": torch.zeros(3)}, str(ck))


def test_overwrite_false_refuses_a_committed_checkpoint(tmp_path: Path) -> None:
    ckptio.save({"w": torch.ones(1)}, str(tmp_path / "ck"))
    with pytest.raises(ckptio.CheckpointError, match="overwrite=True"):
        ckptio.save({"w": torch.zeros(1)}, str(tmp_path / "ck"), overwrite=False)
    dest = {"w": torch.zeros(1)}
    ckptio.load(dest, str(tmp_path / "ck"))
    assert dest["w"].item() == 1.0


@pytest.mark.parametrize("threads", [1, 3])
def test_write_and_read_thread_counts(tmp_path: Path, threads: int) -> None:
    state = {f"t{i}": torch.randn(100 + i) for i in range(7)}
    ckptio.save(state, str(tmp_path / "ck"), thread_count=threads)
    bins = [p for p in (tmp_path / "ck").iterdir() if p.suffix == ".bin"]
    assert len(bins) == threads
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    ckptio.load(dest, str(tmp_path / "ck"), thread_count=threads)
    assert all(torch.equal(dest[k], v) for k, v in state.items())
