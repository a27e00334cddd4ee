"""Bad input gets a specific ckptio error, quickly, and never damages the last good checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.plugins import INSTALL_HINTS

from ._ckpt import (
    clone,
    data_files,
    empty_like_state,
    make_checkpoint,
    read_manifest_json,
    sample_state,
    write_signed_manifest,
)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- URLs and plugins ---------------------------------------------------------------------------
def test_unknown_scheme_names_the_package() -> None:
    with pytest.raises(ckptio.BackendNotFoundError, match="nosuchscheme"):
        ckptio.save(sample_state(), "nosuchscheme://bucket/x")
    # a known but not installed scheme names the pip package that provides it
    missing = []
    for scheme, package in INSTALL_HINTS["backend"].items():
        try:
            ckptio.load(empty_like_state(), f"{scheme}://bucket/x")
        except ckptio.BackendNotFoundError as exc:
            missing.append(scheme)
            assert package.split()[0] in str(exc), str(exc)
        except ckptio.CheckpointError:
            pass  # installed: fails later, as a ckptio error
    if not missing:
        pytest.skip("every hinted backend is installed here")


@pytest.mark.parametrize(
    "url", ["", "   ", "://x", "s3://", "s3:///", "fo o://x", "a+b+c://x", "file://relative/p", "x\x00y"]
)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(ckptio.InvalidURLError):
        ckptio.save(sample_state(), url)
    with pytest.raises(ckptio.InvalidURLError):
        ckptio.load(empty_like_state(), url)


def test_missing_format_plugin(tmp_path: Path) -> None:
    with pytest.raises(ckptio.FormatNotFoundError, match="nosuchformat"):
        ckptio.save(sample_state(), f"nosuchformat+file://{tmp_path}/x")
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_and_step(tmp_path: Path) -> None:
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load(empty_like_state(), str(tmp_path / "nothing"))
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.verify(str(tmp_path / "nothing"))
    with ckptio.CheckpointManager(str(tmp_path / "series")) as mgr:
        with pytest.raises(ckptio.CheckpointNotFoundError):
            mgr.load(empty_like_state())
        mgr.save(1, sample_state())
        with pytest.raises(ckptio.CheckpointNotFoundError, match="no step 7"):
            mgr.load(empty_like_state(), 7)
        with pytest.raises(ValueError):
            mgr.load(empty_like_state(), "newest")


# -- damaged files ------------------------------------------------------------------------------
def test_truncated_data_file(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    victim = data_files(ckpt)[0]
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.raises(ckptio.CorruptCheckpointError, match=victim.name):
        ckptio.load(empty_like_state(), str(ckpt))
    with pytest.raises(ckptio.CorruptCheckpointError, match=victim.name):
        ckptio.verify(str(ckpt))


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"format": "native"}', b"x" * 10000]
)
def test_bad_manifest_json(tmp_path: Path, content: bytes) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    (ckpt / "manifest.json").write_bytes(content)
    with pytest.raises(ckptio.CorruptCheckpointError, match="manifest"):
        ckptio.load(empty_like_state(), str(ckpt))


def _edit(ckpt: Path, fn: Any) -> None:
    body = read_manifest_json(ckpt)
    fn(body)
    write_signed_manifest(ckpt, body)


def _storage(body: dict[str, Any], fqn: str) -> dict[str, Any]:
    return next(e for e in body["format_metadata"]["storage"] if e["fqn"] == fqn)


def _tensor(body: dict[str, Any], fqn: str) -> dict[str, Any]:
    return body["format_metadata"]["dcp"]["state"][fqn]


HOSTILE_EDITS = {
    "absurd file size": lambda b: b["files"][next(iter(b["files"]))].update(size=2**62),
    "absurd tensor size": lambda b: _tensor(b, "model.w").update(
        size=[2**62, 2**62], chunks=[[[0, 0], [2**62, 2**62]]]
    ),
    "absurd dims count": lambda b: _tensor(b, "model.w").update(size=[1] * 10000),
    "negative offset": lambda b: _storage(b, "model.w").update(pos=-8),
    "out of range offset": lambda b: _storage(b, "model.w").update(pos=10**9),
    "length past the end": lambda b: _storage(b, "model.w").update(length=10**6),
    "overlapping chunks": lambda b: _tensor(b, "model.w").update(chunks=[[[0, 0], [6, 8]], [[2, 0], [4, 8]]]),
    "chunk out of range": lambda b: _tensor(b, "model.w").update(chunks=[[[3, 0], [6, 8]]]),
    "unknown dtype": lambda b: _tensor(b, "model.w").update(dtype="object"),
    "traversal file in storage": lambda b: _storage(b, "model.w").update(file="../../../etc/passwd"),
    "absolute file in storage": lambda b: _storage(b, "model.w").update(file="/etc/passwd"),
    "traversal file name": lambda b: b["files"].update({"../../escape.bin": {"size": 4}}),
    "unlisted file": lambda b: _storage(b, "model.w").update(file="other.bin"),
    "huge byte value": lambda b: (
        _storage(b, "step").update(length=2**40),
        b["files"][_storage(b, "step")["file"]].update(size=2**41),
    ),
    "future manifest version": lambda b: b.update(ckptio_manifest=99),
    "extra manifest field": lambda b: b.update(surprise=1),
    "metrics not a dict": lambda b: b.update(metrics=[1, 2]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_hostile_manifest_edits(tmp_path: Path, edit: str) -> None:
    ref = make_checkpoint(tmp_path / "ref")
    ckpt = clone(ref, tmp_path / "c")
    _edit(ckpt, HOSTILE_EDITS[edit])
    outside = {p: p.stat().st_mtime for p in tmp_path.iterdir()}
    if edit != "absurd file size":  # a load checks the chunks it reads, which are intact here
        with pytest.raises(ckptio.CorruptCheckpointError):
            ckptio.load(empty_like_state(), str(ckpt))
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.verify(str(ckpt))
    assert {p: p.stat().st_mtime for p in tmp_path.iterdir()} == outside
    if "traversal" in edit:
        with pytest.raises(ckptio.UnsafeCheckpointError):
            ckptio.load(empty_like_state(), str(ckpt))


def test_latest_pointer_with_traversal_is_ignored(tmp_path: Path) -> None:
    secret = tmp_path / "etc"
    make_checkpoint(secret / "step_00000009")  # a checkpoint outside the series
    root = tmp_path / "a" / "b" / "series"
    with ckptio.CheckpointManager(str(root)) as mgr:
        mgr.save(1, sample_state())
        for pointer in [
            "../../../etc/step_00000009",
            "step_00000009/../../etc",
            "/etc/passwd",
            "\x00",
            "step_1",
        ]:
            (root / "latest").write_text(pointer)
            assert mgr.latest_step() == 1
            dest = empty_like_state()
            mgr.load(dest)
            assert dest["step"] == 3
        (root / "latest").write_bytes(os.urandom(200))
        assert mgr.latest_step() == 1


def test_keys_with_path_syntax_stay_inside(tmp_path: Path) -> None:
    state = {"../../evil": torch.ones(3), "/abs/key": torch.zeros(2), "a/../b": 5}
    ckptio.save(state, str(tmp_path / "c"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    dest = {"../../evil": torch.zeros(3), "/abs/key": torch.ones(2), "a/../b": 0}
    ckptio.load(dest, str(tmp_path / "c"))
    assert torch.equal(dest["../../evil"], torch.ones(3)) and dest["a/../b"] == 5


# -- state mismatches ----------------------------------------------------------------------------
def test_shape_and_dtype_mismatch_lists_the_keys(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    dest = empty_like_state()
    dest["model"]["w"] = torch.zeros(8, 6)
    dest["model"]["ids"] = torch.zeros(7, dtype=torch.int32)
    before = dest["model"]["b"].clone()
    with pytest.raises(ckptio.StateMismatchError) as info:
        ckptio.load(dest, str(ckpt))
    assert info.value.mismatched == ["model.ids", "model.w"]
    assert "model.w" in str(info.value) and "model.ids" in str(info.value)
    assert torch.equal(dest["model"]["b"], before), "a failed load changed the state"


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    dest = empty_like_state()
    del dest["model"]["ids"]
    dest["model"]["new"] = torch.full((2,), 7.0)
    with pytest.raises(ckptio.StateMismatchError) as info:
        ckptio.load(dest, str(ckpt))
    assert info.value.missing == ["model.new"] and info.value.unexpected == ["model.ids"]
    assert "model.new" in str(info.value) and "model.ids" in str(info.value)
    result = ckptio.load(dest, str(ckpt), strict=False)
    assert result.missing == ["model.new"] and result.unexpected == ["model.ids"]
    assert torch.equal(dest["model"]["new"], torch.full((2,), 7.0))
    assert torch.equal(dest["model"]["w"], sample_state()["model"]["w"])


# -- the last good checkpoint survives failed saves -------------------------------------------------
@pytest.mark.parametrize(
    "bad_state",
    [
        {"model": {"w": torch.ones(2)}, "obj": object()},
        {"model": {"w": torch.ones(2)}, "s": {1, 2}},
        "not a dict",
    ],
)
def test_failed_save_keeps_last_good(tmp_path: Path, bad_state: Any) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    before = snapshot(ckpt)
    with pytest.raises(ckptio.CheckpointError):
        ckptio.save(bad_state, str(ckpt))
    assert snapshot(ckpt) == before
    with ckptio.CheckpointManager(str(tmp_path / "series")) as mgr:
        mgr.save(1, sample_state())
        with pytest.raises(ckptio.CheckpointError):
            mgr.save(2, bad_state)
        with pytest.raises(ckptio.CheckpointError):
            mgr.save(1, bad_state)  # overwriting the good step fails before touching it
        assert mgr.steps() == [1] and mgr.latest_step() == 1
        dest = empty_like_state()
        mgr.load(dest)
        assert dest["step"] == 3


def test_invalid_step_numbers(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError):
                mgr.save(bad, sample_state())  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == []


def test_manifest_json_is_plain_json(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    body = json.loads((ckpt / "manifest.json").read_text())
    assert body["format"] == "native" and body["checksum"].startswith("xxh3_64:")
