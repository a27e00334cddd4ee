"""Leftovers of killed saves that the commit protocol reclaims (ckptio.commit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ckptio
import torch
from ckptio.commit import file_token, identity, new_token, tag_file_name


def _dead_identity() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {**identity(), "pid": proc.pid, "token": "x", "heartbeat": 0}


def test_a_killed_lease_rewrite_leaves_no_temp_file(tmp_path: Path) -> None:
    """A process killed while rewriting its lease leaves ``..<lease>.<hex>.tmp``; the next touch
    of that target removes it with the dead lease and staging directory."""
    token = new_token()
    lease = tmp_path / f".step_1.{token}.ckptio-lease"
    lease.write_text(json.dumps(_dead_identity()))
    temp = tmp_path / f".{lease.name}.0123456789abcdef.tmp"
    temp.write_text("{")
    staging = tmp_path / f".step_1.{token}.ckptio-partial"
    staging.mkdir()
    (staging / "__0_0.bin").write_bytes(b"x")
    ckptio.save({"w": torch.ones(2)}, str(tmp_path / "step_1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_live_lease_temp_files_are_left_alone(tmp_path: Path) -> None:
    token = new_token()
    lease = tmp_path / f".step_1.{token}.ckptio-lease"
    lease.write_text(json.dumps({**identity(), "token": token}))  # this process: alive
    temp = tmp_path / f".{lease.name}.0123456789abcdef.tmp"
    temp.write_text("{")
    ckptio.save({"w": torch.ones(2)}, str(tmp_path / "step_1"))
    assert temp.exists() and lease.exists()


def test_tagged_file_names() -> None:
    token = new_token()
    assert tag_file_name("__0_1.bin", token) == f"__0_1.{token}.bin"
    assert tag_file_name("model/rank00000-00.safetensors", token) == f"model/rank00000-00.{token}.safetensors"
    assert tag_file_name("x.bin", "") == "x.bin"
    assert file_token(tag_file_name("model/rank00000-00.safetensors", token)) == token
    assert file_token("__0_1.bin") is None and file_token("manifest.json") is None
