"""The local backend and the rename commit: atomicity, durability (fsync), error mapping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.commit import PARTIAL_SUFFIX, parse_leftover
from ckptio.formats.native import NativeWriter
from ckptio_local import LocalBackend


def _value(path: Path) -> float:
    dest = {"w": torch.zeros(4)}
    ckptio.load(dest, str(path))
    return float(dest["w"][0])


class _Spy:
    """Addon that checks, between data write and commit, what a reader sees."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: dict[str, Any] = {}

    def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
        final = Path(ctx.path)
        staging = Path(ctx.write_path)
        self.seen["staging"] = staging
        parsed = parse_leftover(staging.name)  # .<name>.<token>.ckptio-partial: unique per save
        self.seen["staging_name_ok"] = (
            parsed is not None
            and parsed[1] is not None
            and parsed[0] == final.name
            and parsed[2] == PARTIAL_SUFFIX
        )
        self.seen["staging_has_data"] = any(p.suffix == ".bin" for p in staging.iterdir())
        self.seen["staging_has_manifest"] = (staging / "manifest.json").exists()
        self.seen["old_value_mid_save"] = _value(final) if final.exists() else None
        if self.fail:
            raise RuntimeError("addon failed before the commit")


def test_new_checkpoint_appears_only_at_commit(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    spy = _Spy()
    ckptio.save({"w": torch.full((4,), 1.0)}, str(ck), addons=[spy])
    assert spy.seen["staging_name_ok"] and spy.seen["staging_has_data"]
    assert not spy.seen["staging_has_manifest"], "the manifest (the commit) is written last"
    assert spy.seen["old_value_mid_save"] is None, "nothing is visible under the final name before commit"
    assert not spy.seen["staging"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_overwrite_keeps_the_old_checkpoint_until_commit(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.full((4,), 1.0)}, str(ck))
    spy = _Spy()
    ckptio.save({"w": torch.full((4,), 2.0)}, str(ck), addons=[spy])
    assert spy.seen["old_value_mid_save"] == 1.0
    assert _value(ck) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no staging or old directory left behind"


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.full((4,), 1.0)}, str(ck))
    with pytest.raises(RuntimeError, match="addon failed"):
        ckptio.save({"w": torch.full((4,), 2.0)}, str(ck), addons=[_Spy(fail=True)])
    assert _value(ck) == 1.0
    ckptio.verify(str(ck))


def test_failed_tensor_write_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "ck"
    ckptio.save({"w": torch.full((4,), 1.0)}, str(ck))
    original = NativeWriter._write_file

    def failing(self: NativeWriter, name: str, items: Any, planner: Any) -> Any:
        original(self, name, items, planner)  # the bytes land in the staging directory...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(NativeWriter, "_write_file", failing)
    with pytest.raises(ckptio.StorageError, match="No space left"):
        ckptio.save({"w": torch.full((4,), 2.0)}, str(ck))
    monkeypatch.undo()
    assert _value(ck) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "a failed save removes its staging directory"
    # the next save cleans the staging directory and commits normally
    ckptio.save({"w": torch.full((4,), 3.0)}, str(ck))
    assert _value(ck) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_interrupted_first_save_is_not_a_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        ckptio.save({"w": torch.ones(4)}, str(ck), addons=[_Spy(fail=True)])
    assert not ck.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the failed save removed its staging"
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load({"w": torch.zeros(4)}, str(ck))


def test_fsync_files_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    ck = tmp_path / "ck"
    ckptio.save({"a": torch.ones(8), "b": torch.ones(8), "n": 3}, str(ck), thread_count=2)
    names = {Path(p).name for p in synced}
    assert {"__0_0.bin", "__0_1.bin"} <= names, synced  # every data file
    assert any(n.startswith(".manifest.json.") for n in names), synced  # the manifest, before its rename
    assert any(n.startswith(".ck.") and n.endswith(PARTIAL_SUFFIX) for n in names), (
        "the staging directory, after the manifest"
    )
    assert str(tmp_path) in synced, "the parent directory, after the rename"
    synced.clear()
    ckptio.save({"a": torch.ones(8)}, str(tmp_path / "fast"), storage_options={"fsync": False})
    assert synced == []


def test_write_bytes_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend()
    target = str(tmp_path / "latest")
    b.write_bytes(target, b"step_1\n")
    b.write_bytes(target, b"step_2\n")
    assert Path(target).read_bytes() == b"step_2\n"

    def broken_replace(src: str, dst: str, **kw: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ckptio.StorageError, match="Input/output error"):
        b.write_bytes(target, b"step_3 partial")
    assert Path(target).read_bytes() == b"step_2\n", "readers see the old content or the new, never a mix"
    assert os.listdir(tmp_path) == ["latest"], "no temporary file left behind"


def test_open_write_publishes_nothing_on_error(tmp_path: Path) -> None:
    b = LocalBackend()
    path = str(tmp_path / "d" / "data.bin")
    with pytest.raises(ValueError), b.open_write(path) as f:
        f.write(b"half")
        raise ValueError("writer died")
    assert not os.path.exists(path)
    with b.open_write(path) as f:
        f.write(b"whole")
    assert b.read_bytes(path) == b"whole" and b.size(path) == 5
    assert b.read_bytes(path, 1, 3) == b"hol"


def test_read_into_and_errors(tmp_path: Path) -> None:
    b = LocalBackend()
    path = str(tmp_path / "f.bin")
    b.write_bytes(path, bytes(range(16)))
    out = bytearray(8)
    b.read_into(path, 4, memoryview(out))
    assert bytes(out) == bytes(range(4, 12))
    with pytest.raises(ckptio.CorruptCheckpointError, match="truncated"):
        b.read_into(path, 12, memoryview(bytearray(8)))
    with pytest.raises(ckptio.CheckpointNotFoundError):
        b.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(ckptio.CheckpointNotFoundError):
        b.size(str(tmp_path / "missing"))
    assert b.listdir(str(tmp_path / "missing")) == []
    b.remove(str(tmp_path / "missing"), recursive=True)  # missing is not an error
    with pytest.raises(ckptio.StorageError):
        b.makedirs(str(tmp_path / "f.bin" / "sub"))  # a file is in the way


def test_walk_listdir_remove(tmp_path: Path) -> None:
    b = LocalBackend()
    root = str(tmp_path / "r")
    for name in ("a.bin", "sub/b.bin", "sub/deeper/c.bin"):
        b.write_bytes(b.join(root, name), b"x")
    assert b.listdir(root) == ["a.bin", "sub"]
    assert sorted(b.walk_files(root)) == ["a.bin", "sub/b.bin", "sub/deeper/c.bin"]
    assert b.is_dir(b.join(root, "sub")) and not b.is_dir(b.join(root, "a.bin"))
    b.remove(b.join(root, "sub"), recursive=True)
    assert b.listdir(root) == ["a.bin"]
    with pytest.raises(ckptio.InvalidURLError):
        b.join(root, "../escape")
