"""Fuzz damaged and hostile checkpoints: only ckptio errors, no hang, no unbounded allocation.

Every example copies a small reference checkpoint, damages it (flipped or truncated data, raw
manifest damage, structured manifest edits re-signed with a valid self-checksum, traversal names,
absurd sizes, overlapping or out-of-range chunks, hostile ``latest`` pointers) and then loads and
verifies it. The only acceptable outcomes are success (the edit was harmless, e.g. a metric) or a
:class:`ckptio.CheckpointError`; pytest-timeout catches hangs and the process' peak RSS growth is
bounded.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._ckpt import (
    clone,
    data_files,
    load_and_verify,
    make_checkpoint,
    read_manifest_json,
    write_signed_manifest,
)

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ref") / "ckpt")


@pytest.fixture(scope="module", autouse=True)
def bounded_memory() -> Iterator[None]:
    """No fuzz case may make ckptio allocate what a hostile manifest asks for."""
    before = _peak_rss_mb()
    yield
    grown = _peak_rss_mb() - before
    assert grown < 1024, f"peak RSS grew by {grown:.0f} MB while fuzzing"


def only_ckptio_errors(ckpt: Path, strict: bool = True) -> ckptio.CheckpointError | None:
    try:
        load_and_verify(ckpt, strict=strict)
    except ckptio.CheckpointError as exc:
        return exc
    return None


# -- data files ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_flipped_byte_in_data_file_names_the_file(reference: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = clone(reference, Path(tmp) / "c")
        victim = data.draw(st.sampled_from(data_files(ckpt)), label="file")
        raw = bytearray(victim.read_bytes())
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
        victim.write_bytes(bytes(raw))
        for action in (lambda: ckptio.load(make_dest(), str(ckpt)), lambda: ckptio.verify(str(ckpt))):
            with pytest.raises(ckptio.CorruptCheckpointError) as info:
                action()
            assert victim.name in str(info.value), str(info.value)


def make_dest() -> dict[str, Any]:
    from ._ckpt import empty_like_state

    return empty_like_state()


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_truncated_or_extended_data_file(reference: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = clone(reference, Path(tmp) / "c")
        victim = data.draw(st.sampled_from(data_files(ckpt)), label="file")
        raw = victim.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        victim.write_bytes(
            raw[:cut] if data.draw(st.booleans(), label="truncate") else raw + b"\0" * (cut + 1)
        )
        err = only_ckptio_errors(ckpt)
        assert isinstance(err, ckptio.CorruptCheckpointError), err


# -- manifest: raw damage --------------------------------------------------------------------
@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_raw_manifest_damage(reference: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = clone(reference, Path(tmp) / "c")
        mpath = ckpt / "manifest.json"
        raw = bytearray(mpath.read_bytes())
        how = data.draw(st.sampled_from(["flip", "truncate", "garbage", "insert"]), label="how")
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        if how == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif how == "truncate":
            del raw[pos:]
        elif how == "garbage":
            raw = bytearray(data.draw(st.binary(max_size=300), label="garbage"))
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=20), label="ins")
        mpath.write_bytes(bytes(raw))
        err = only_ckptio_errors(ckpt)
        # whitespace-only edits keep the JSON (and its checksum) intact
        assert err is None or isinstance(err, ckptio.CheckpointError)
        if err is None:
            assert load_ok_values(ckpt)


def load_ok_values(ckpt: Path) -> bool:
    import torch

    from ._ckpt import sample_state

    dest = make_dest()
    ckptio.load(dest, str(ckpt))
    want = sample_state()
    return all(torch.equal(dest["model"][k], want["model"][k]) for k in want["model"]) and dest["step"] == 3


# -- manifest: structured edits, re-signed ------------------------------------------------------
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**62, 2**63, 2**64 - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(
        ["../../etc/passwd", "/etc/passwd", "..", "a/../../b", "__0_0.bin", "float32", "bfloat16"]
    ),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from json_paths(v, (*prefix, i))


def apply_edit(body: dict[str, Any], path: tuple[Any, ...], op: str, value: Any) -> None:
    parent: Any = body
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "set":
        parent[key] = value
    elif op == "rename" and isinstance(parent, dict):  # a dict key becomes the new value's text
        parent[str(value)] = parent.pop(key)
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))


@pytest.mark.timeout(240)
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_structured_manifest_edits(reference: Path, data: st.DataObject) -> None:
    body = read_manifest_json(reference)
    paths = [p for p in json_paths(body) if p and p[0] != "checksum"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = clone(reference, Path(tmp) / "c")
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            paths = [p for p in json_paths(body) if p and p[0] != "checksum"]
            path = data.draw(st.sampled_from(paths), label="path")
            op = data.draw(st.sampled_from(["set", "set", "delete", "rename", "duplicate"]), label="op")
            apply_edit(body, path, op, data.draw(JSON_VALUE, label="value"))
        write_signed_manifest(ckpt, body)
        strict = data.draw(st.booleans(), label="strict")
        only_ckptio_errors(ckpt, strict=strict)  # raises anything that is not a CheckpointError
        # nothing outside the checkpoint was read or touched: the reference is intact
        assert (Path(tmp) / "c").exists()


# -- hostile manifests, re-signed: chunk lists, planner paths, sizes, nesting, numbers -------------
HUGE = st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64, 10**30, 300_000_000, 1 << 20])
NUMBER = st.one_of(
    st.integers(-3, 70),
    HUGE,
    st.sampled_from([-(2**63), -1, 0.5, 1e300, -0.0, True, None, "7"]),
)
PATH_PART = st.one_of(
    st.text(max_size=4), st.integers(-2, 5), HUGE, st.sampled_from([True, None, 1.5, "model", "w"])
)


@st.composite
def hostile_edit(draw: st.DrawFn, fqns: list[str]) -> tuple[str, Any]:
    """One hostile edit: (kind, parameters), applied by :func:`apply_hostile`."""
    kind = draw(st.sampled_from(["chunks", "planner", "sizes", "depth", "numbers"]))
    if kind == "chunks":  # a chunk list for model.w (6x8), data and checksums rewritten to match
        dims = draw(st.sampled_from([2, 2, 2, 1, 3]))
        coord = st.one_of(st.integers(0, 8), st.integers(-2, -1), HUGE)
        box = st.tuples(
            st.lists(coord, min_size=dims, max_size=dims), st.lists(coord, min_size=dims, max_size=dims)
        )
        return kind, draw(st.lists(box, min_size=0, max_size=400))
    if kind == "planner":
        path = st.lists(PATH_PART, min_size=0, max_size=draw(st.sampled_from([3, 3, 80])))
        keys = st.one_of(st.sampled_from(fqns), st.text(max_size=8))
        return kind, draw(st.dictionaries(keys, path, max_size=6))
    if kind == "sizes":
        where = draw(st.sampled_from(["tensor size", "file size", "pos", "length", "chunk"]))
        return kind, (where, draw(st.sampled_from(fqns)), draw(NUMBER), draw(st.integers(1, 70)))
    if kind == "depth":
        field = draw(st.sampled_from(["user", "metrics", "format_metadata.dcp.planner_data", "files.x"]))
        return kind, (field, draw(st.sampled_from([1, 31, 33, 200, 600, 5000, 100_000])), draw(st.booleans()))
    field = draw(
        st.sampled_from(["created", "world_size", "step", "ckptio_manifest", "metrics.loss", "user.n"])
    )
    return kind, (
        field,
        draw(st.one_of(NUMBER, st.sampled_from(["1" * 5000, "1e400", "-1e309", "NaN", "1.5e-320"]))),
    )


def apply_hostile(ckpt: Path, edits: list[tuple[str, Any]]) -> None:
    """Apply ``edits`` to the checkpoint's manifest and sign it again."""
    from ._ckpt import sample_state, write_chunked, write_signed_text

    rest = []
    for kind, arg in edits:  # chunk lists that fit the tensor get matching data and checksums
        if kind == "chunks" and ckpt.joinpath("__0_0.bin").exists():
            if all(len(b[0]) == 2 and all(0 <= x <= 64 for part in b for x in part) for b in arg):
                write_chunked(
                    ckpt, "model.w", sample_state()["model"]["w"], [(tuple(o), tuple(s)) for o, s in arg]
                )
                continue
        rest.append((kind, arg))
    body = read_manifest_json(ckpt)
    raw: dict[str, str] = {}
    for edit in rest:
        _hostile_edit(body, raw, edit)
    write_signed_text(ckpt, body, raw)


def _hostile_edit(body: dict[str, Any], raw: dict[str, str], edit: tuple[str, Any]) -> None:
    import math

    kind, arg = edit
    fm = body["format_metadata"]
    state, storage = fm["dcp"]["state"], fm["storage"]
    if kind == "chunks":
        state["model.w"]["chunks"] = [list(map(list, b)) for b in arg]
    elif kind == "planner":
        fm["dcp"]["planner_data"] = arg
    elif kind == "sizes":
        where, fqn, value, ndim = arg
        entry = next(e for e in storage if e["fqn"] == fqn)
        if where == "tensor size" and state.get(fqn):
            state[fqn]["size"] = [value] * min(ndim, 3) if ndim < 65 else [1] * ndim
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                # consistent everywhere: one chunk, a matching length and a file that claims it
                n = math.prod(state[fqn]["size"])
                state[fqn]["chunks"] = [[[0] * len(state[fqn]["size"]), state[fqn]["size"]]]
                entry["offsets"] = [0] * len(state[fqn]["size"])
                entry["length"] = n * 4
                body["files"][entry["file"]]["size"] = entry["pos"] + entry["length"]
        elif where == "file size":
            body["files"][entry["file"]]["size"] = value
        elif where in ("pos", "length"):
            entry[where] = value
        elif state.get(fqn):
            state[fqn]["chunks"][0][ndim % 2] = [value] * len(state[fqn]["size"])
    elif kind == "depth":
        field, depth, as_list = arg
        nested = ("[" * depth + "1" + "]" * depth) if as_list else ('{"a":' * depth + "1" + "}" * depth)
        placeholder = f"@@nested{len(raw)}@@"
        raw[placeholder] = nested
        if field == "files.x":
            body["files"]["x"] = placeholder
        elif field.startswith("format_metadata"):
            fm["dcp"]["planner_data"] = {"model.w": placeholder}
        else:
            body[field] = {"k": placeholder}
    else:
        field, value = arg
        if isinstance(value, str) and (
            value[:1].isdigit() or value in ("1e400", "-1e309", "NaN", "1.5e-320")
        ):
            placeholder = f"@@number{len(raw)}@@"
            raw[placeholder] = value
            value = placeholder
        if "." in field:
            top, key = field.split(".")
            body[top][key] = value
        else:
            body[field] = value


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ._ckpt import sample_state

    root = tmp_path_factory.mktemp("refs")
    ckptio.save(sample_state(), f"safetensors+file://{root / 'safetensors'}")
    return {"native": make_checkpoint(root / "native"), "safetensors": root / "safetensors"}


@pytest.mark.timeout(240)
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_hostile_manifests_fail_cleanly_fast_and_small(
    references: dict[str, Path], data: st.DataObject
) -> None:
    """Issue 11: whatever a validly signed manifest says, load, verify, ``inspect``, ``ls`` and
    ``cp --full`` end in success or a ckptio error, each within 2 s and 512 MB."""
    from ckptio import cli

    from ._ckpt import peak_rss_mb, reset_peak_rss_mb

    fmt = data.draw(st.sampled_from(sorted(references)), label="format")
    fqns = [e["fqn"] for e in read_manifest_json(references[fmt])["format_metadata"]["storage"]]
    edits = data.draw(st.lists(hostile_edit(fqns), min_size=1, max_size=2), label="edits")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = clone(references[fmt], Path(tmp) / "c")
        apply_hostile(ckpt, edits)
        actions = {
            "load": lambda: load_and_verify(ckpt, strict=False),
            "inspect": lambda: _cli(cli, "inspect", str(ckpt)),
            "ls": lambda: _cli(cli, "ls", str(ckpt)),
            "cp --full": lambda: _cli(cli, "cp", "--full", str(ckpt), str(Path(tmp) / "out")),
        }
        for name, action in actions.items():
            base = reset_peak_rss_mb()
            t0 = time.monotonic()
            try:
                action()
            except ckptio.CheckpointError:
                pass
            elapsed, grown = time.monotonic() - t0, peak_rss_mb() - base
            assert elapsed < 2.0, f"{name} took {elapsed:.1f} s"
            assert grown < 512, f"{name} grew the peak RSS by {grown:.0f} MB"


def _cli(cli: Any, *args: str) -> None:
    """A ``ckptio`` command in this process: success or a checkpoint error, nothing else."""
    code = cli.main(list(args))
    assert code in (cli.EXIT_OK, cli.EXIT_CHECKPOINT), (args, code)
