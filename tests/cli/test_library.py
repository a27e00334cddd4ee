"""The library under the command line: ``ckptio.copy``, ``ckptio.load_state`` and
``CheckpointManager.delete``, called directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ckptio
import pytest
import torch

from ._helpers import make_state, tiny_model


def _reference(url: str) -> dict:
    """What ``ckptio.load`` puts into a fresh template: the ground truth for ``load_state``."""
    state = make_state(tiny_model(99), step=-1)
    ckptio.load(state, url)
    return {
        "model": dict(state["model"].state_dict()),
        "optim": state["optim"].state_dict(),
        "step": state["step"],
        "config": state["config"],
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# -- load_state ------------------------------------------------------------------------------------
def test_load_state_reads_a_checkpoint_without_a_template(single: Path) -> None:
    state = ckptio.load_state(str(single))
    assert sorted(state) == ["config", "model", "optim", "step"]
    assert _same(state, _reference(str(single)))
    assert state["config"] == {"lr": 1e-3, "name": "tiny", "betas": (0.9, 0.95)} and state["step"] == 7
    assert all(t.device.type == "cpu" for t in state["model"].values())
    # what it returns goes straight into a model
    model = tiny_model(3)
    model.load_state_dict(state["model"])
    assert torch.equal(model[0].weight, state["model"]["0.weight"])


def test_load_state_keys(single: Path) -> None:
    assert sorted(ckptio.load_state(str(single), keys=["model"])) == ["model"]
    sub = ckptio.load_state(str(single), keys=["model.0", "config.name", "step"])
    assert sorted(sub["model"]) == ["0.bias", "0.weight"]
    assert sub["config"] == {"name": "tiny"} and sub["step"] == 7
    one = ckptio.load_state(str(single), keys="model.2.weight")
    assert list(one) == ["model"] and list(one["model"]) == ["2.weight"]
    with pytest.raises(ckptio.StateMismatchError, match="nothing under 'nope'") as info:
        ckptio.load_state(str(single), keys=["model", "nope"])
    assert info.value.missing == ["nope"]
    with pytest.raises(ckptio.StateMismatchError):
        ckptio.load_state(str(single), keys=["mod"])  # a key is a whole name, not a prefix of one


def test_load_state_safetensors_verify_and_errors(single: Path, series: Path, tmp_path: Path) -> None:
    pytest.importorskip("ckptio_safetensors")
    st = tmp_path / "st"
    ckptio.save(make_state(tiny_model(1), step=7), f"safetensors+file://{st}")
    assert _same(ckptio.load_state(str(st)), ckptio.load_state(str(single)))
    with pytest.raises(ckptio.CheckpointNotFoundError, match="series"):
        ckptio.load_state(str(series))  # one checkpoint, as ckptio.load takes
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.load_state(str(tmp_path / "nothing"))
    data = sorted(p for p in single.iterdir() if p.suffix == ".bin")[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptio.CorruptCheckpointError, match="checksum"):
        ckptio.load_state(str(single))
    assert sorted(ckptio.load_state(str(single), verify=False)) == ["config", "model", "optim", "step"]


# -- copy ------------------------------------------------------------------------------------------
def test_copy_converts_and_copies(single: Path, series: Path, tmp_path: Path) -> None:
    pytest.importorskip("ckptio_safetensors")
    st = tmp_path / "st"
    r = ckptio.copy(str(single), f"safetensors+file://{st}", progress=False)
    assert (r.mode, r.format, r.step, r.via_root) == ("convert", "safetensors", None, None)
    assert r.bytes == ckptio.manifest(str(st)).total_bytes and r.bytes_read > 0
    m = ckptio.manifest(str(st))
    assert m.format == "safetensors" and m.world_size == 1 and m.metadata == {"run": "cli-test"}
    back = tmp_path / "back"
    r = ckptio.copy(str(st), str(back), format="native")
    assert r.mode == "convert" and ckptio.manifest(str(back)).format == "native"
    assert _same(ckptio.load_state(str(back)), ckptio.load_state(str(single)))
    # same format: the files as they are, the manifest byte for byte
    same = tmp_path / "same"
    r = ckptio.copy(str(single), str(same))
    assert r.mode == "files" and r.files == len(ckptio.manifest(str(single)).files)
    assert (same / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    # refused unless asked; never onto itself
    with pytest.raises(ckptio.CheckpointError, match="overwrite"):
        ckptio.copy(str(single), str(same))
    assert ckptio.copy(str(single), str(same), overwrite=True, full=True).mode == "convert"
    with pytest.raises(ckptio.InvalidURLError, match="same location"):
        ckptio.copy(str(single), f"file://{single}")
    # a series root: its newest committed step, or the one asked for
    r = ckptio.copy(str(series), str(tmp_path / "s10"), step=10)
    assert (r.step, r.via_root) == (10, str(series)) and ckptio.manifest(str(tmp_path / "s10")).step == 10
    with pytest.raises(ckptio.FormatNotFoundError):
        ckptio.copy(str(single), str(tmp_path / "x"), format="nosuchformat")
    assert not (tmp_path / "x").exists()


def test_copy_conversion_keeps_addons_metrics_and_artifacts(tmp_path: Path) -> None:
    class Note:
        name = "note"

        def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
            ctx.write_bytes("notes/readme.txt", b"hello")

    src = tmp_path / "src"
    with ckptio.CheckpointManager(str(src), addons=[Note()]) as mgr:
        mgr.save(
            3, {"w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 1}}, metrics={"loss": float("nan")}
        )
    dst = tmp_path / "dst"
    r = ckptio.copy(str(src), str(dst), full=True)
    assert r.artifacts == ["notes/readme.txt"] and r.step == 3
    m = ckptio.manifest(str(dst))
    assert m.addons == ["note"] and m.step == 3 and m.metrics == {"loss": "nan"}
    assert (dst / "notes" / "readme.txt").read_bytes() == b"hello" and ckptio.verify(str(dst)) > 0
    out = ckptio.load_state(str(dst))
    assert torch.equal(out["w"], torch.arange(6.0).reshape(2, 3)) and out["meta"] == {"epoch": 1}


def test_copy_reads_each_tensor_when_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion streams: large tensors are read one at a time, on demand, and small ones
    in bounded batches, never the whole checkpoint at once."""
    from ckptio import copying
    from ckptio.reading import Source

    big = {f"big{i}": torch.full((300_000,), float(i)) for i in range(6)}  # 1.2 MB each
    small = {f"s{i}": torch.full((10,), float(i)) for i in range(50)}
    src = tmp_path / "src"
    ckptio.save({"model": {**big, **small}, "step": 1}, str(src))
    batches: list[list[str]] = []
    real = Source.read_tensors

    def spy(self: Source, fqns: list[str], alloc: object = None) -> dict:
        batches.append(list(fqns))
        return real(self, fqns, alloc)  # type: ignore[arg-type]

    monkeypatch.setattr(Source, "read_tensors", spy)
    monkeypatch.setattr(copying, "PREFETCH_BYTES", 200)  # 5 small tensors per batch
    ckptio.copy(str(src), str(tmp_path / "dst"), full=True, thread_count=1)
    bigs = [b for b in batches if any(f.startswith("model.big") for f in b)]
    assert sorted(bigs) == sorted([[f"model.big{i}"] for i in range(6)]), "one read per large tensor"
    smalls = [b for b in batches if b not in bigs]
    assert all(len(b) <= 6 for b in smalls) and sum(map(len, smalls)) == 50
    out = ckptio.load_state(str(tmp_path / "dst"))
    assert all(torch.equal(out["model"][k], v) for k, v in {**big, **small}.items())


# -- CheckpointManager.delete ----------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(root: Path, step: int, token: str, pid: int) -> None:
    """A save's staging directory and lease, as ckptio writes them; ``pid`` owns the lease."""
    from ckptio.commit import identity

    name = f"step_{step:08d}"
    (root / f".{name}.{token}.ckptio-partial").mkdir()
    (root / f".{name}.{token}.ckptio-partial" / "__0_0.bin").write_bytes(b"x")
    lease = {**identity(), "pid": pid, "pid_start": None, "heartbeat": time.time(), "token": token}
    (root / f".{name}.{token}.ckptio-lease").write_text(json.dumps(lease))


def test_manager_delete_removes_leftovers_and_repairs_latest(series: Path) -> None:
    _leftovers(series, 30, "0123456789ab", _dead_pid())
    _leftovers(series, 40, "ba9876543210", _dead_pid())
    _leftovers(series, 50, "aaaaaaaaaaaa", os.getpid())  # a live save (this process)
    with ckptio.CheckpointManager(str(series)) as mgr:
        with pytest.raises(ckptio.CheckpointError, match="protected"):
            mgr.delete(30)
        done = mgr.delete(30, force=True)
        assert (done.step, done.committed, done.removed, done.busy) == (30, True, True, {})
        assert (series / "latest").read_text().strip() == "step_00000020"
        assert not any(".step_00000030." in n for n in os.listdir(series))
        done = mgr.delete(40)  # only leftovers of a dead save
        assert (done.committed, done.removed) == (False, True)
        done = mgr.delete(50)  # a save still running: left alone
        assert not done.removed and list(done.busy) == ["aaaaaaaaaaaa"]
        assert done.busy["aaaaaaaaaaaa"]["pid"] == os.getpid()
        with pytest.raises(ckptio.CheckpointNotFoundError):
            mgr.delete(60)
        mgr.delete(10)
        mgr.delete(20, force=True)
        assert mgr.steps() == [] and mgr.latest_step() is None
    assert not (series / "latest").exists(), "no committed step left: no pointer"
    assert sorted(n for n in os.listdir(series) if "step_" in n) == [
        ".step_00000050.aaaaaaaaaaaa.ckptio-lease",
        ".step_00000050.aaaaaaaaaaaa.ckptio-partial",
    ]


def test_rm_uses_manager_delete_only() -> None:
    """``ckptio rm`` holds no deletion logic of its own and reads no manager internals."""
    import inspect

    from ckptio.cli import rm

    source = inspect.getsource(rm)
    for private in ("_step_path", "_STEP_RE", "remove_leftovers", "LATEST_NAME", ".remove("):
        assert private not in source
    assert "mgr.delete(" in source


def test_core_does_not_name_a_plugin() -> None:
    core = Path(ckptio.__file__).parent
    offenders = [str(p) for p in core.rglob("*.py") if "ckptio_safetensors" in p.read_text()]
    assert offenders == []
