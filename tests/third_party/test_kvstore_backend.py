"""A third-party backend distribution, installed with pip, serves a new scheme with no core change.

The fixture installs ``tests/third_party/kvstore_backend`` (editable, entry point group ``ckptio``)
into the test interpreter's environment and uninstalls it afterwards; a fresh interpreter (the
way users meet a newly installed plugin) then saves and loads through ``kv://``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DIST = Path(__file__).parent / "kvstore_backend"
DIST_NAME = "ckptio-kvstore-example"


def _pip(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def kv_installed() -> Iterator[None]:
    _pip("install", "--no-build-isolation", "--no-deps", "-e", str(DIST))
    try:
        yield
    finally:
        _pip("uninstall", "-y", DIST_NAME)


_USE = """
import json, sys
import torch
import ckptio
from ckptio_kvstore import KVBackend

root = sys.argv[1]
info = {p.name: p.as_dict() for p in ckptio.list_plugins()}["kvstore"]
state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16), "step": 7}
results = {"plugin": info}
for label, opts in (("memory", None), ("directory", {"root": root})):
    url = "kv://store/run/ck"
    ckptio.save(state, url, storage_options=opts)
    dest = {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "step": 0}
    ckptio.load(dest, url, storage_options=opts)
    m = ckptio.manifest(url, storage_options=opts)
    with ckptio.CheckpointManager("kv://store/series", storage_options=opts, retention=ckptio.KeepLatest(1)) as mgr:
        for step in (1, 2):
            mgr.save(step, state)
        mgr.wait()
    with ckptio.CheckpointManager("kv://store/series", storage_options=opts) as mgr:
        steps = mgr.steps()
    backend = KVBackend(root=opts["root"]) if opts else KVBackend()
    try:
        ckptio.load(dest, "kv://store/nothing", storage_options=opts)
        missing = None
    except ckptio.CheckpointNotFoundError as exc:
        missing = type(exc).__name__
    results[label] = {
        "equal": torch.equal(dest["w"], state["w"]) and torch.equal(dest["b"], state["b"]) and dest["step"] == 7,
        "verified": ckptio.verify(url, storage_options=opts),
        "format": m.format,
        "files": sorted(backend.listdir("store/run/ck")),
        "steps": steps,
        "missing": missing,
        "isinstance": isinstance(backend, ckptio.Backend),
    }
print(json.dumps(results))
"""


def test_kv_scheme_from_an_installed_distribution(kv_installed: None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CKPTIO_PLUGINS"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_USE), str(tmp_path / "kvdir")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["plugin"]["distribution"] == DIST_NAME and res["plugin"]["backends"] == ["kv"]
    for label in ("memory", "directory"):
        r = res[label]
        assert r["isinstance"] and r["equal"] and r["format"] == "native", (label, r)
        assert r["verified"] > 0 and "manifest.json" in r["files"], (label, r)
        assert r["steps"] == [2] and r["missing"] == "CheckpointNotFoundError", (label, r)
    assert any(n.startswith("store%2Frun%2Fck%2F") for n in os.listdir(tmp_path / "kvdir"))
