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
