"""The native reader's I/O hints (issue 15): behaviour, not speed.

While DCP plans a load, the native reader asks the kernel to start reading the head of each reader
thread's share (``posix_fadvise(WILLNEED)``, :meth:`NativeReader.bind_state`), and every data file
it opens for reading is marked sequential. These are hints: they must open files exactly as reads
do (no links, regular files only), never fail a load, never stand in for a verified read, and stay
within the checkpoint's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.errors import CheckpointError, CorruptCheckpointError
from ckptio.formats import native
from ckptio.manifest import Manifest

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")

BLOCK = native.BLOCK


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": ((torch.arange(3 * BLOCK + 12345) * 7 + seed) % 251).to(torch.uint8),
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g),
        "layers.0.w": torch.randn(16, 16, generator=g),
    }


def _zeros_like(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


@pytest.fixture
def fadvise_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int, str]]:
    """Every ``posix_fadvise`` call: (fd, offset, length, advice, the fd's file)."""
    calls: list[tuple[int, int, int, int, str]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((fd, offset, length, advice, os.readlink(f"/proc/self/fd/{fd}")))
        real(fd, offset, length, advice)

    monkeypatch.setattr(native.os, "posix_fadvise", spy)
    return calls


def _save(tmp_path: Path, sd: dict[str, torch.Tensor], threads: int = 2) -> Path:
    path = tmp_path / "ckpt"
    ckptio.save(sd, str(path), thread_count=threads)
    return path


def test_load_hints_sequential_and_prefetch_within_the_checkpoint(
    tmp_path: Path, fadvise_calls: list[Any]
) -> None:
    sd = _state()
    path = _save(tmp_path, sd)
    dest = _zeros_like(sd)
    ckptio.load(dest, str(path), thread_count=4)
    for k in sd:
        assert torch.equal(dest[k], sd[k]), k
    seq = [c for c in fadvise_calls if c[3] == os.POSIX_FADV_SEQUENTIAL]
    ahead = [c for c in fadvise_calls if c[3] == os.POSIX_FADV_WILLNEED]
    assert seq and ahead
    sizes = {p.name: p.stat().st_size for p in path.glob("*.bin")}
    for _, off, length, _, target in ahead:
        name = Path(target).name
        assert Path(target).parent == path.resolve() and name in sizes  # only the data files
        assert 0 <= off and 0 < length <= native.PREFETCH and off + length <= sizes[name]
    assert len(ahead) <= 4  # one span per reader thread at most
    assert {Path(c[4]).name for c in seq} <= set(sizes)


def test_no_prefetch_with_one_thread_or_for_keys_not_asked_for(
    tmp_path: Path, fadvise_calls: list[Any]
) -> None:
    sd = _state()
    path = _save(tmp_path, sd)
    dest = _zeros_like(sd)
    ckptio.load(dest, str(path), thread_count=1)
    assert not [c for c in fadvise_calls if c[3] == os.POSIX_FADV_WILLNEED]
    assert torch.equal(dest["big"], sd["big"])

    fadvise_calls.clear()
    small = {"b": torch.zeros(32)}  # a partial load: only the file and place holding "b"
    ckptio.load(small, str(path), strict=False, thread_count=4)
    assert torch.equal(small["b"], sd["b"])
    ahead = [c for c in fadvise_calls if c[3] == os.POSIX_FADV_WILLNEED]
    manifest = Manifest.from_bytes((path / "manifest.json").read_bytes(), str(path))
    _, entries = native.metadata_from_json(manifest.format_metadata, manifest.files, str(path))
    (entry,) = [e for e in entries.values() if e.fqn == "b"]
    assert [(Path(c[4]).name, c[1]) for c in ahead] == [(entry.file, entry.pos)]


def test_wanted_entries_follow_dcp_names() -> None:
    def entry(fqn: str, file: str = "f", pos: int = 0) -> Any:
        return native._Entry(fqn, (0,), (1,), torch.uint8, file, pos, 1, ("0",))

    entries = [entry("model.w", pos=3), entry("model.b", pos=1), entry("opt.x"), entry("model2.w", pos=9)]
    got = native._wanted_entries(entries, {"model": {}, "step": 1})
    assert [e.fqn for e in got] == ["model.b", "model.w"]  # sorted by position; model2 is not model
    assert [e.fqn for e in native._wanted_entries(entries, {"model.w": 1})] == ["model.w"]
    assert native._wanted_entries(entries, {}) == []


def test_share_heads_match_the_reader_shares() -> None:
    def entry(fqn: str, file: str, pos: int, length: int) -> Any:
        return native._Entry(fqn, (0,), (length,), torch.uint8, file, pos, length, None)

    a = entry("a", "f0", 0, 4 * BLOCK)
    b = entry("b", "f0", 4 * BLOCK, 10)
    c = entry("c", "f1", 0, 4 * BLOCK)
    files = {"f0": {"size": 4 * BLOCK + 10}, "f1": {"size": 4 * BLOCK}}
    heads = native._share_heads([a, c], 4, 2 * BLOCK, files)
    # four shares of 2 blocks each, cut between blocks, each span inside its file
    assert heads == [
        ("f0", 0, 2 * BLOCK),
        ("f0", 2 * BLOCK, 2 * BLOCK),
        ("f1", 0, 2 * BLOCK),
        ("f1", 2 * BLOCK, 2 * BLOCK),
    ]
    assert native._share_heads([b], 4, BLOCK, files) == [("f0", 4 * BLOCK, 10)]
    # with the 10 bytes of b, a share is a little over 2 blocks: the second starts a block later
    assert [h[:2] for h in native._share_heads([a, b, c], 4, BLOCK, files)] == [
        ("f0", 0),
        ("f0", 3 * BLOCK),
        ("f1", 0),
        ("f1", 2 * BLOCK),
    ]
    assert native._share_heads([], 4, BLOCK, files) == []
    # a declared size that does not hold the span shortens it; a missing or bad one drops it
    assert native._share_heads([a], 1, 8 * BLOCK, {"f0": {"size": BLOCK}}) == [("f0", 0, BLOCK)]
    assert native._share_heads([a], 1, BLOCK, {"f0": {"size": "x"}}) == []
    assert native._share_heads([a], 1, BLOCK, {}) == []


def test_prefetch_never_fails_a_load_and_never_replaces_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state()
    path = _save(tmp_path, sd)

    def broken(*args: Any) -> None:
        raise OSError("fadvise refused")

    monkeypatch.setattr(native.os, "posix_fadvise", broken)
    dest = _zeros_like(sd)
    ckptio.load(dest, str(path), thread_count=4)
    assert all(torch.equal(dest[k], sd[k]) for k in sd)
    monkeypatch.undo()

    data = max(path.glob("*.bin"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside a prefetched share head or not: it is still verified
    raw[5] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError):
        ckptio.load(_zeros_like(sd), str(path), thread_count=4)


def test_prefetch_does_not_follow_a_data_file_replaced_by_a_link(
    tmp_path: Path, fadvise_calls: list[Any]
) -> None:
    sd = _state()
    path = _save(tmp_path, sd)
    outside = tmp_path / "outside.bin"
    data = max(path.glob("*.bin"), key=lambda p: p.stat().st_size)
    outside.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(CheckpointError):
        ckptio.load(_zeros_like(sd), str(path), thread_count=4)
    assert all(Path(c[4]) != outside.resolve() for c in fadvise_calls)


def test_single_chunk_tensor_still_checked() -> None:
    """One chunk per tensor skips the tiling sweep; it must still hold the whole tensor."""
    fm = {
        "dcp": {
            "state": {"t": {"dtype": "float32", "size": [4, 4], "chunks": [[[0, 0], [4, 4]]]}},
            "planner_data": None,
        },
        "storage": [{"fqn": "t", "offsets": [0, 0], "file": "f.bin", "pos": 0, "length": 64, "xxh3": ["0"]}],
    }
    files = {"f.bin": {"size": 64}}
    native.metadata_from_json(fm, files, "x")
    for chunk in ([[0, 0], [4, 3]], [[0, 1], [4, 4]], [[1, 0], [3, 4]]):
        bad = {**fm, "dcp": {**fm["dcp"], "state": {"t": {**fm["dcp"]["state"]["t"], "chunks": [chunk]}}}}
        with pytest.raises(CorruptCheckpointError):
            native.metadata_from_json(bad, files, "x")
