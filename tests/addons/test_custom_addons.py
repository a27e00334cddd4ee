"""Custom addons: a separately installed package found through entry points, and runtime ones."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio.plugins import unregister

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "custom_addon"


@pytest.fixture(scope="session")
def example_addon_installed() -> None:
    """Install the example package into the venv (editable, offline) unless it already is."""
    try:
        importlib.metadata.distribution("ckptio-example-addon")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-build-isolation",
                "--no-deps",
                "-e",
                str(EXAMPLE),
            ],
            check=True,
        )


def _python(code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run in a fresh interpreter, so discovery goes through the installed entry points."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp),
    )


@pytest.mark.slow
def test_installed_package_addon_runs_its_hooks(tmp_path, example_addon_installed):
    proc = _python(
        """
        import json, os, sys, torch, ckptio
        root = sys.argv[1]
        info = {p.name: p for p in ckptio.list_plugins()}["example-addon"]
        assert info.distribution == "ckptio-example-addon" and info.addons == ["run-info"], info
        assert info.error is None and not info.skipped, info
        state = {"w": torch.arange(4.0)}
        ckptio.save(state, root + "/ck", addons=[("run-info", {"run_name": "exp7"})])
        info = json.load(open(root + "/ck/run_info.json"))
        assert info["run_name"] == "exp7" and info["world_size"] == 1, info
        assert "run_info.json" in ckptio.manifest(root + "/ck").files
        dest = {"w": torch.zeros(4)}
        ckptio.load(dest, root + "/ck", addons=[("run-info", {"run_name": "exp7"})])
        assert torch.equal(dest["w"], torch.arange(4.0))
        try:
            ckptio.load(dest, root + "/ck", addons=[("run-info", {"run_name": "other"})])
        except ckptio.CheckpointError as e:
            print("REFUSED:", e)
        ckptio.save(state, root + "/plain")
        try:
            ckptio.load(dest, root + "/plain", addons=["run-info"])
        except ckptio.CheckpointError as e:
            print("MISSING:", e)
        print("OK")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED:" in proc.stdout and "belongs to run 'exp7', not 'other'" in proc.stdout
    assert "MISSING:" in proc.stdout and "run_info.json" in proc.stdout
    assert proc.stdout.strip().endswith("OK")


class Recorder:
    """A plain object: methods named like hooks are hooks (no decorator, no base class)."""

    name = "recorder"

    def __init__(self, tag: str = "x") -> None:
        self.tag = tag
        self.calls: list[str] = []

    def on_save_start(self, ctx: ckptio.AddonContext) -> None:
        self.calls.append("on_save_start")
        if ctx.is_coordinator:
            ctx.write_bytes("recorder.json", json.dumps({"tag": self.tag, "step": ctx.step}).encode())

    def transform_state_dict(self, ctx: ckptio.AddonContext, state_dict: dict[str, Any]) -> None:
        self.calls.append(f"transform_state_dict:{ctx.op}")
        if "w" in state_dict:  # store under another name, give it back on load
            state_dict["renamed_w"] = state_dict.pop("w")

    def restore_state_dict(self, ctx: ckptio.AddonContext, state_dict: dict[str, Any]) -> None:
        self.calls.append("restore_state_dict")
        state_dict["w"] = state_dict.pop("renamed_w")

    def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
        self.calls.append("on_tensors_written")

    def after_commit(self, ctx: ckptio.AddonContext) -> None:
        self.calls.append("after_commit")
        assert ctx.manifest is not None and "recorder.json" in ctx.manifest.files

    def validate_load(self, ctx: ckptio.AddonContext) -> None:
        self.calls.append("validate_load")
        assert json.loads(ctx.read_bytes("recorder.json"))["tag"] == self.tag

    def on_load_end(self, ctx: ckptio.AddonContext) -> None:
        self.calls.append("on_load_end")


def test_instance_addon_sees_every_hook_in_order(tmp_path):
    rec = Recorder("a")
    url = str(tmp_path / "ck")
    ckptio.save({"w": torch.ones(3)}, url, addons=[rec])
    assert rec.calls == ["on_save_start", "transform_state_dict:save", "on_tensors_written", "after_commit"]
    assert os.path.exists(os.path.join(url, "recorder.json"))
    rec.calls.clear()
    dest = {"w": torch.zeros(3)}
    ckptio.load(dest, url, addons=[rec])
    assert rec.calls == ["validate_load", "transform_state_dict:load", "restore_state_dict", "on_load_end"]
    assert torch.equal(dest["w"], torch.ones(3))


def test_runtime_registered_addon_by_name_with_options(tmp_path):
    made: list[Recorder] = []

    def factory(**options: Any) -> Recorder:
        made.append(Recorder(**options))
        return made[-1]

    ckptio.register_addon("recorder", factory)
    try:
        with ckptio.CheckpointManager(tmp_path, addons=[("recorder", {"tag": "b"})]) as mgr:
            mgr.save(5, {"w": torch.ones(2)})
            dest = {"w": torch.zeros(2)}
            mgr.load(dest)
        assert torch.equal(dest["w"], torch.ones(2))
        assert json.loads((tmp_path / "step_00000005" / "recorder.json").read_text()) == {
            "tag": "b",
            "step": 5,
        }
        assert (
            "validate_load" in made[0].calls
            and "recorder" in ckptio.manifest(str(tmp_path / "step_00000005")).addons
        )
    finally:
        unregister("addon", "recorder")
    with pytest.raises(ckptio.AddonNotFoundError):
        ckptio.save({"w": torch.ones(1)}, str(tmp_path / "x"), addons=["recorder"])
