"""Hostile but validly signed metadata (issue 11): every defect is a ckptio error, found quickly.

An attacker can re-sign a manifest (its checksum is not a MAC), so each test below edits the
metadata of a real checkpoint, signs it again (``write_signed_manifest``) and checks that ckptio
refuses it with a :class:`ckptio.CorruptCheckpointError` (or a clear state error) before it reads,
allocates or spends more than the metadata's size justifies.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
import xxhash
from ckptio.formats.native import metadata_from_json, tiling_problem
from ckptio.manifest import MAX_MANIFEST_BYTES, Manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._ckpt import (
    Box,
    clone,
    data_files,
    empty_like_state,
    load_and_verify,
    make_checkpoint,
    peak_rss_mb,
    read_manifest_json,
    reset_peak_rss_mb,
    sample_state,
    write_chunked,
    write_signed_manifest,
)


def _edit(ckpt: Path, fn: Any) -> None:
    body = read_manifest_json(ckpt)
    fn(body)
    write_signed_manifest(ckpt, body)


def _storage(body: dict[str, Any], fqn: str) -> dict[str, Any]:
    return next(e for e in body["format_metadata"]["storage"] if e["fqn"] == fqn)


def _refused(ckpt: Path, match: str | None = None) -> None:
    """Both a load and ``ckptio.verify`` refuse ``ckpt`` as corrupt."""
    with pytest.raises(ckptio.CorruptCheckpointError, match=match):
        ckptio.load(empty_like_state(), str(ckpt))
    with pytest.raises(ckptio.CorruptCheckpointError, match=match):
        ckptio.verify(str(ckpt))


def _cpu() -> float:
    return time.process_time()


# -- 6: checksums are required -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["null", "missing"])
@pytest.mark.parametrize("fqn", ["model.w", "step"])
def test_missing_checksum_is_corruption_unless_verify_false(tmp_path: Path, how: str, fqn: str) -> None:
    ckpt = make_checkpoint(tmp_path / "c")

    def strip(body: dict[str, Any]) -> None:
        entry = _storage(body, fqn)
        if how == "null":
            entry["xxh3"] = None
        else:
            del entry["xxh3"]

    _edit(ckpt, strip)
    _refused(ckpt, match="no checksum")
    dest = empty_like_state()
    ckptio.load(dest, str(ckpt), verify=False)  # the explicit opt-out still reads it
    assert torch.equal(dest["model"]["w"], sample_state()["model"]["w"]) and dest["step"] == 3


def test_swapped_data_with_null_checksums_is_not_loaded(tmp_path: Path) -> None:
    """Finding 6 without the symlink: other bytes of the right size, checksums nulled."""
    ckpt = make_checkpoint(tmp_path / "c", thread_count=1)
    victim = data_files(ckpt)[0]
    secret = os.urandom(victim.stat().st_size)
    victim.write_bytes(secret)

    def null_all(body: dict[str, Any]) -> None:
        for entry in body["format_metadata"]["storage"]:
            entry["xxh3"] = None

    _edit(ckpt, null_all)
    _refused(ckpt, match="no checksum")


def test_safetensors_null_checksum_is_corruption(tmp_path: Path) -> None:
    ckpt = tmp_path / "st"
    ckptio.save(sample_state(), f"safetensors+file://{ckpt}")
    _edit(ckpt, lambda b: _storage(b, "model.w").update(xxh3=None))
    _refused(ckpt, match="no checksum")
    ckptio.load(empty_like_state(), str(ckpt), verify=False)


# -- 8 and 11: chunk coverage, for any number of chunks --------------------------------------------
def _chunked_checkpoint(tmp_path: Path, tensor: torch.Tensor, chunks: list[Box]) -> Path:
    ckpt = tmp_path / "chunked"
    ckptio.save({"w": torch.zeros_like(tensor)}, str(ckpt))
    write_chunked(ckpt, "w", tensor, chunks)
    return ckpt


def _load_w(ckpt: Path, like: torch.Tensor) -> torch.Tensor:
    dest = {"w": torch.full_like(like, -1)}
    ckptio.load(dest, str(ckpt))
    return dest["w"]


def test_300_chunks_with_an_overlap_and_a_gap_are_refused(tmp_path: Path) -> None:
    tensor = torch.arange(600, dtype=torch.float32)
    chunks: list[Box] = [((2 * i,), (2,)) for i in range(300)]
    chunks[10] = ((21,), (2,))  # overlaps [22, 24), leaves 20 unwritten; same total volume
    ckpt = _chunked_checkpoint(tmp_path, tensor, chunks)
    with pytest.raises(ckptio.CorruptCheckpointError, match="overlap or leave a gap"):
        _load_w(ckpt, tensor)
    with pytest.raises(ckptio.CorruptCheckpointError, match="overlap or leave a gap"):
        ckptio.verify(str(ckpt))


def test_2d_grid_with_a_shifted_chunk_is_refused(tmp_path: Path) -> None:
    tensor = torch.arange(40 * 40, dtype=torch.float32).reshape(40, 40)
    chunks: list[Box] = [((2 * i, 2 * j), (2, 2)) for i in range(20) for j in range(20)]
    assert tiling_problem((40, 40), chunks) is None
    (r, c), _ = chunks[123]
    chunks[123] = ((r, c + 1), (2, 2))  # overlaps its right neighbour, leaves column c unwritten
    ckpt = _chunked_checkpoint(tmp_path, tensor, chunks)
    with pytest.raises(ckptio.CorruptCheckpointError, match="overlap or leave a gap"):
        _load_w(ckpt, tensor)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["1d", "2d"])
def test_32k_chunks_parse_and_verify_in_well_under_2s(tmp_path: Path, shape: str) -> None:
    """Issue 11: 32k chunks took 40 s to parse and 50 s to verify (quadratic)."""
    if shape == "1d":
        tensor = torch.arange(32768, dtype=torch.float32)
        chunks: list[Box] = [((i,), (1,)) for i in range(32768)]
    else:
        tensor = torch.arange(256 * 256, dtype=torch.float32).reshape(256, 256)
        chunks = [((i, 2 * j), (1, 2)) for i in range(256) for j in range(128)]  # 32768
    ckpt = _chunked_checkpoint(tmp_path, tensor, chunks)
    raw = (ckpt / "manifest.json").read_bytes()
    t0 = _cpu()
    m = Manifest.from_bytes(raw, "m")
    metadata_from_json(m.format_metadata, m.files, "m")
    parse = _cpu() - t0
    t0 = _cpu()
    ckptio.verify(str(ckpt))
    verify = _cpu() - t0
    print(f"32k chunks ({shape}): parse {parse:.2f} s, verify {verify:.2f} s of CPU")
    assert parse + verify < 2.0, (parse, verify)
    assert torch.equal(_load_w(ckpt, tensor), tensor)
    # the same number of chunks with one overlap is found as fast
    bad = list(chunks)
    o, s = bad[-2]
    bad[-2] = (tuple(x + (1 if d == len(o) - 1 else 0) for d, x in enumerate(o)), s)
    bad_ckpt = _chunked_checkpoint(tmp_path / "bad", tensor, bad)
    t0 = _cpu()
    with pytest.raises(ckptio.CorruptCheckpointError, match="overlap or leave a gap|start at"):
        ckptio.verify(str(bad_ckpt))
    assert _cpu() - t0 < 2.0


def test_irregular_layout_is_refused_quickly() -> None:
    """A layout costing quadratic work whichever dimension is swept first: refused, not slow."""
    n = 1500
    # rows [0, n) x cols [0, n]: n full-height columns, the last column cut into n cells ...
    boxes: list[Box] = [((0, j), (n, 1)) for j in range(n)] + [((i, n), (1, 1)) for i in range(n)]
    # ... rows [n, 2n] x cols [n+1, 2n]: the same transposed, and one box in each other corner
    boxes += [((n + i, n + 1), (1, n)) for i in range(n)] + [((2 * n, n + 1 + j), (1, 1)) for j in range(n)]
    boxes += [((0, n + 1), (n, n)), ((n, 0), (n + 1, n + 1))]
    size = (2 * n + 1, 2 * n + 1)
    assert sum(math.prod(s) for _, s in boxes) == math.prod(size)
    t0 = _cpu()
    assert tiling_problem(size, boxes) == "are laid out too irregularly to check; refusing"
    assert _cpu() - t0 < 2.0


BOX = st.tuples(st.integers(0, 5), st.integers(1, 4), st.integers(0, 5), st.integers(1, 4))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(boxes=st.lists(BOX, min_size=1, max_size=8), rows=st.integers(1, 6), cols=st.integers(1, 6))
def test_tiling_check_agrees_with_counting_cells(boxes: list[tuple[int, ...]], rows: int, cols: int) -> None:
    inside = [((r, c), (h, w)) for r, h, c, w in boxes if r + h <= rows and c + w <= cols]
    count = torch.zeros(rows, cols, dtype=torch.int64)
    for (r, c), (h, w) in inside:
        count[r : r + h, c : c + w] += 1
    exact = bool((count == 1).all())
    assert (tiling_problem((rows, cols), inside) is None) == exact


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cuts=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=4), min_size=1, max_size=3))
def test_any_grid_tiles(cuts: list[list[int]]) -> None:
    """What DCP writes (a grid from per-dimension cuts, uneven included) always passes."""
    size = tuple(10 for _ in cuts)
    edges = [sorted({0, 10, *c}) for c in cuts]
    boxes: list[Box] = [((), ())]
    for e in edges:
        boxes = [(o + (a,), s + (b - a,)) for o, s in boxes for a, b in zip(e, e[1:])]
    assert tiling_problem(size, boxes) is None


# -- 11: planner_data paths --------------------------------------------------------------------------
BAD_PATHS: dict[str, Any] = {
    "huge list index": {"model.w": ["model", "w"], "model.300000000": ["model", 300000000]},
    "path not matching its key": {"model.w": ["model", 3]},
    "not a list": {"model.w": "model.w"},
    "empty": {"model.w": []},
    "bool": {"model.True": ["model", True]},
    "negative": {"model.-1": ["model", -1]},
    "float": {"model.1.0": ["model", 1.0]},
    "int first": {"0.w": [0, "w"]},
    "too deep": {".".join(["a"] * 100): ["a"] * 100},
    "value and container": {"a": ["a"], "a.b": ["a", "b"]},
    "list and dict": {"a.0": ["a", 0], "a.b": ["a", "b"]},
    "many big lists": {f"a.{i}.1048575": ["a", i, 1048575] for i in range(8)},
    "not a dict": [["model", "w"]],
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_planner_paths_are_refused(tmp_path: Path, case: str) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    _edit(ckpt, lambda b: b["format_metadata"]["dcp"].update(planner_data=BAD_PATHS[case]))
    _refused(ckpt, match="planner_data")


def test_cp_full_with_a_huge_planner_index_allocates_nothing(tmp_path: Path) -> None:
    from ckptio import cli

    ckpt = make_checkpoint(tmp_path / "c")
    big = "model.300000000"

    def rename(body: dict[str, Any]) -> None:  # consistent everywhere: only the index is hostile
        dcp = body["format_metadata"]["dcp"]
        dcp["state"][big] = dcp["state"].pop("model.w")
        dcp["planner_data"].pop("model.w")
        dcp["planner_data"][big] = ["model", 300000000]
        _storage(body, "model.w")["fqn"] = big

    _edit(ckpt, rename)
    before = reset_peak_rss_mb()
    t0 = time.monotonic()
    code = cli.main(["cp", "--full", str(ckpt), str(tmp_path / "out")])
    assert code == cli.EXIT_CHECKPOINT
    assert time.monotonic() - t0 < 10 and peak_rss_mb() - before < 512
    assert not (tmp_path / "out").exists()


def test_valid_nested_paths_still_load(tmp_path: Path) -> None:
    state = {
        "opt": {"groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2}]},
        "w": [torch.ones(2), torch.zeros(3)],
    }
    ckptio.save(state, str(tmp_path / "c"))
    dest = {"opt": {"groups": [{"lr": 0.0, "params": []}, {"lr": 0.0}]}, "w": [torch.zeros(2), torch.ones(3)]}
    ckptio.load(dest, str(tmp_path / "c"))
    assert dest["opt"]["groups"][1]["lr"] == 0.2 and torch.equal(dest["w"][1], torch.zeros(3))


# -- 11: manifest size and entry counts ------------------------------------------------------------------
def test_manifest_limit_is_sane() -> None:
    assert MAX_MANIFEST_BYTES == 64 << 20
    with pytest.raises(ckptio.CorruptCheckpointError, match="more than"):
        Manifest.from_bytes(b" " * (MAX_MANIFEST_BYTES + 1), "m")


def _many_values_manifest(tmp_path: Path, n: int) -> Path:
    """A checkpoint of ``n`` small JSON values, written as ckptio writes them (but quickly)."""
    ckpt = tmp_path / "values"
    ckptio.save({"v": {"0": 0}}, str(ckpt))
    body = read_manifest_json(ckpt)
    digest = xxhash.xxh3_64_hexdigest(b"7")
    (ckpt / "v.bin").write_bytes(b"7" * n)
    fm = body["format_metadata"]
    fm["dcp"]["state"] = {f"v.{i}": None for i in range(n)}
    fm["dcp"]["planner_data"] = {f"v.{i}": ["v", str(i)] for i in range(n)}
    fm["storage"] = [
        {"fqn": f"v.{i}", "offsets": None, "file": "v.bin", "pos": i, "length": 1, "xxh3": [digest]}
        for i in range(n)
    ]
    body["files"] = {"v.bin": {"size": n}}
    write_signed_manifest(ckpt, body)
    return ckpt


def _parse_cost(ckpt: Path) -> tuple[float, float]:
    """CPU seconds and peak memory growth (MB) of parsing ``ckpt``'s manifest and metadata."""
    raw = (ckpt / "manifest.json").read_bytes()
    base = reset_peak_rss_mb()
    t0 = _cpu()
    m = Manifest.from_bytes(raw, "m")
    metadata_from_json(m.format_metadata, m.files, "m")
    return _cpu() - t0, peak_rss_mb() - base


@pytest.mark.timeout(180)
def test_300k_values_parse_linearly(tmp_path: Path) -> None:
    """Issue 11: 300k small values (a 41 MB manifest) took 26 s and 1.5 GB to load."""
    small, _ = _parse_cost(_many_values_manifest(tmp_path / "small", 30_000))
    ckpt = _many_values_manifest(tmp_path / "big", 300_000)
    size = (ckpt / "manifest.json").stat().st_size
    parse, grown = _parse_cost(ckpt)
    t0 = _cpu()
    assert ckptio.verify(str(ckpt)) == 300_000
    verify = _cpu() - t0
    print(
        f"300k values, {size / 1e6:.0f} MB manifest: parse {parse:.2f} s (30k: {small:.2f} s), "
        f"verify {verify:.2f} s of CPU, peak memory +{grown:.0f} MB"
    )
    assert parse < 40 * small + 2.0, "parsing is not linear in the number of entries"  # quadratic: 100x
    assert parse < 8 and verify < 12 and grown < 1024


def test_too_many_entries_are_refused_before_parsing_them(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    _edit(
        ckpt,
        lambda b: b["format_metadata"]["dcp"]["state"].update({f"x{i}": None for i in range((1 << 20) + 1)}),
    )
    t0 = _cpu()
    with pytest.raises(ckptio.CorruptCheckpointError, match="entries"):
        ckptio.verify(str(ckpt))
    assert _cpu() - t0 < 10


# -- 13: hostile fields ------------------------------------------------------------------------------------
@pytest.mark.parametrize("created", [1e300, -1, True, "yesterday", 2**80])
def test_absurd_creation_time(tmp_path: Path, created: Any) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    _edit(ckpt, lambda b: b.update(created=created))
    _refused(ckpt, match="manifest|creation")
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.manifest(str(ckpt))


@pytest.mark.parametrize("depth", [40, 600])
def test_deep_user_metadata(tmp_path: Path, depth: int) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    user: Any = 1
    for _ in range(depth):
        user = {"a": user}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * depth))
    try:
        _edit(ckpt, lambda b: b.update(user=user))
    finally:
        sys.setrecursionlimit(limit)
    _refused(ckpt, match="nested")


@pytest.mark.parametrize("names", [[], {"model.w": 5}, {"model.w": ["model"]}, {"model.w": [1, 2]}, "x"])
def test_safetensors_names_of_the_wrong_type(tmp_path: Path, names: Any) -> None:
    ckpt = tmp_path / "st"
    ckptio.save(sample_state(), f"safetensors+file://{ckpt}")
    _edit(ckpt, lambda b: b["format_metadata"].update(names=names))
    _refused(ckpt, match="names")


@pytest.mark.parametrize("fmt", ["native", "safetensors"])
def test_2_40_element_tensor_is_refused_before_allocation(tmp_path: Path, fmt: str) -> None:
    from ckptio import cli

    ckpt = tmp_path / "c"
    ckptio.save({"w": torch.ones(4)}, f"{fmt}+file://{ckpt}")
    n = 1 << 40

    def huge(body: dict[str, Any]) -> None:
        fm = body["format_metadata"]
        fm["dcp"]["state"]["w"].update(size=[n], chunks=[[[0], [n]]])
        entry = _storage(body, "w")
        entry["length"] = 4 * n
        body["files"][entry["file"]]["size"] = entry["pos"] + 4 * n
        if fmt == "native":
            entry["xxh3"] = ["0" * 16] * math.ceil(4 * n / (16 << 20))

    _edit(ckpt, huge)
    before = reset_peak_rss_mb()
    with pytest.raises(ckptio.CorruptCheckpointError, match="the manifest says"):
        ckptio.load({"w": torch.ones(4)}, str(ckpt))
    with pytest.raises(ckptio.CorruptCheckpointError, match="the manifest says"):
        ckptio.verify(str(ckpt))
    assert cli.main(["cp", "--full", str(ckpt), str(tmp_path / "out")]) == cli.EXIT_CHECKPOINT
    assert peak_rss_mb() - before < 512


def test_declared_size_is_compared_with_the_file_before_reading(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c", thread_count=1)
    victim = data_files(ckpt)[0]
    with victim.open("ab") as f:
        f.write(b"\0" * 100)  # the data the manifest describes is intact: only the size differs
    _refused(ckpt, match="the manifest says")


# -- 9: quantized tensors ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["native", "safetensors"])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8, torch.qint32])
def test_quantized_tensors_are_refused_at_save(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    q = torch.quantize_per_tensor(torch.linspace(-1, 1, 8), 0.1, 2 if dtype != torch.qint8 else 0, dtype)
    with pytest.raises(ckptio.StateMismatchError, match=r"quantized.*model\.q.*int_repr") as info:
        ckptio.save({"model": {"q": q, "w": torch.ones(2)}}, f"{fmt}+file://{tmp_path / 'c'}")
    assert info.value.mismatched == ["model.q"]
    assert not (tmp_path / "c").exists()


def test_quantized_dtype_in_a_manifest_is_unknown(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    _edit(ckpt, lambda b: b["format_metadata"]["dcp"]["state"]["model.ids"].update(dtype="quint8"))
    _refused(ckpt, match="unknown dtype")


# -- 14: a missing data file is corruption, not "not found" ---------------------------------------------
@pytest.mark.parametrize("fmt", ["native", "safetensors"])
def test_missing_data_file_is_corruption(tmp_path: Path, fmt: str) -> None:
    ckpt = tmp_path / "c"
    ckptio.save(sample_state(), f"{fmt}+file://{ckpt}")
    victim = next(p for p in sorted(ckpt.rglob("*")) if p.suffix in (".bin", ".safetensors"))
    victim.unlink()
    for action in (lambda: ckptio.load(empty_like_state(), str(ckpt)), lambda: ckptio.verify(str(ckpt))):
        with pytest.raises(ckptio.CorruptCheckpointError, match="missing") as info:
            action()
        assert not isinstance(info.value, FileNotFoundError)
        assert victim.name in str(info.value)


# -- 17: meta tensors, reserved names ---------------------------------------------------------------------
def test_loading_into_meta_tensors_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    dest = empty_like_state()
    dest["model"]["w"] = torch.empty(6, 8, device="meta")
    with pytest.raises(ckptio.StateMismatchError, match=r"meta device.*model\.w.*[Mm]aterialise") as info:
        ckptio.load(dest, str(ckpt))
    assert info.value.mismatched == ["model.w"]


def test_safetensors_group_names_never_collide_with_checkpoint_files(tmp_path: Path) -> None:
    reserved = [
        "manifest.json",
        "model.safetensors.index.json",
        "values-rank00000.json",
        "a",
        "a~",
        ".hidden",
    ]
    state: dict[str, Any] = {k: {"w": torch.full((3,), float(i))} for i, k in enumerate(reserved)}
    state["top"] = torch.arange(4)
    state["n"] = 5
    ckpt = tmp_path / "st"
    ckptio.save(state, f"safetensors+file://{ckpt}")
    assert (ckpt / "manifest.json").is_file()
    dirs = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert len(dirs) == len(reserved)
    assert not any(
        d in ("manifest.json", "model.safetensors.index.json", "values-rank00000.json") for d in dirs
    )
    dest: dict[str, Any] = {k: {"w": torch.zeros(3)} for k in reserved}
    dest.update(top=torch.zeros(4, dtype=torch.int64), n=0)
    ckptio.load(dest, str(ckpt))
    assert all(torch.equal(dest[k]["w"], torch.full((3,), float(i))) for i, k in enumerate(reserved))
    assert dest["n"] == 5 and torch.equal(dest["top"], torch.arange(4))
    ckptio.verify(str(ckpt))


# -- 10: the HF index is read with a bound -------------------------------------------------------------------
def test_sparse_hf_index_is_not_read(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    with (hf / "model.safetensors.index.json").open("wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse
    before = reset_peak_rss_mb()
    t0 = time.monotonic()
    with pytest.raises(ckptio.CorruptCheckpointError, match="index"):
        ckptio.load({"w": torch.zeros(2)}, f"safetensors+file://{hf}")
    assert time.monotonic() - t0 < 5 and peak_rss_mb() - before < 256


def test_reference_checkpoint_still_loads(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    load_and_verify(clone(ckpt, tmp_path / "d"))
    body = json.loads((ckpt / "manifest.json").read_text())
    assert body["format"] == "native"
