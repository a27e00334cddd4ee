"""Several writers on one step of an object store (``marker`` commit mode), on a real S3 server.

On object stores a save writes its data in place (there is no directory rename), so two saves of
one step used to write the same objects: the surviving manifest could describe the other save's
bytes. Each save now names its data files with its own token and lists only those in its
manifest, and the commit removes older saves' files only once no live save owns them
(``Target._sweep``). Two real processes overwrite the same few steps for a while, a third runs
``ckptio rm``; afterwards every committed step must verify and hold one save's values, and no
orphaned data file may remain once each step has been saved again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ckptio
import pytest
import torch

DURATION_S = float(os.environ.get("CKPTIO_CONCURRENCY_S", "8"))
STEPS = 3

WRITER = textwrap.dedent(
    """
    import json, random, sys, time
    import torch, ckptio
    root, wid, duration, steps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(wid)
    end = time.time() + duration
    out = []
    while time.time() < end:
        step = rng.randrange(steps)
        value = float(wid * 1000 + step)
        state = {"a": torch.full((64, 64), value), "b": torch.full((4096,), value), "tag": value}
        fmt = "safetensors+" if rng.random() < 0.3 else ""
        try:
            ckptio.save(state, f"{fmt}{root}/step_{step:08d}", overwrite=True, thread_count=2)
            out.append(["ok", step, value])
        except ckptio.CheckpointError as exc:
            out.append(["err", step, type(exc).__name__])
    print(json.dumps(out))
    """
)

REMOVER = textwrap.dedent(
    """
    import random, subprocess, sys, time
    root, duration, cli, steps = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    rng = random.Random(7)
    end = time.time() + duration
    while time.time() < end:
        subprocess.run([cli, "rm", root, str(rng.randrange(steps)), "--force"], capture_output=True)
        time.sleep(0.3)
    """
)


def _run(cmds: list[list[str]], env: dict[str, str]) -> list[str]:
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=DURATION_S + 180)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.servers
def test_two_writers_overwriting_steps_on_s3(s3_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import fsspec

    bucket = s3_env.make_bucket()
    root = f"s3://{bucket}/run"
    cli = str(Path(sys.executable).parent / "ckptio")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = _run(
        [
            [sys.executable, "-c", WRITER, root, "1", str(DURATION_S), str(STEPS)],
            [sys.executable, "-c", WRITER, root, "2", str(DURATION_S), str(STEPS)],
            [sys.executable, "-c", REMOVER, root, str(DURATION_S), cli, str(STEPS)],
        ],
        env,
    )
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs[:2]]
    oks = sum(1 for r in results for kind, *_ in r if kind == "ok")
    errors = {name for r in results for kind, _, name in r if kind == "err"}
    assert oks > 5, f"too few saves succeeded to prove anything: {oks}"
    assert errors <= {"CheckpointError", "ConcurrentWriteError"}, errors

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for step in range(STEPS):
        url = f"{root}/step_{step:08d}"
        try:
            ckptio.verify(url)
        except ckptio.CheckpointNotFoundError:
            continue
        dest = {"a": torch.empty(64, 64), "b": torch.empty(4096), "tag": None}
        ckptio.load(dest, url)
        value = float(dest["tag"])
        assert int(value) % 1000 == step
        assert torch.all(dest["a"] == value) and torch.all(dest["b"] == value), f"{url} mixes two saves"
    # one more save of each step (no writer alive now) leaves exactly the files its manifest lists
    for step in range(STEPS):
        url = f"{root}/step_{step:08d}"
        try:
            ckptio.save({"x": torch.ones(2)}, url)
        except ckptio.CheckpointError:  # a step left without a manifest: not ours to replace
            ckptio.save({"x": torch.ones(2)}, f"{root}/fresh_{step}")
            continue
        listed = set(ckptio.manifest(url).files) | {"manifest.json"}
        prefix = f"{bucket}/run/step_{step:08d}/"
        present = {p.removeprefix(prefix) for p in fs.find(prefix)}
        assert present == listed, sorted(present - listed)
    leases = [p for p in fs.ls(f"{bucket}/run", detail=False) if p.endswith(".ckptio-lease")]
    assert leases == [], leases
    print(f"{oks} saves succeeded; errors: {sorted(errors)}")


def test_marker_save_names_its_files_and_sweeps_the_old_ones() -> None:
    """On memory:// (a marker store): an overwrite replaces the data files, none are left over."""
    import fsspec

    url = "memory://ckptio-marker-test/step_1"
    fs = fsspec.filesystem("memory")
    ckptio.save({"w": torch.full((8,), 1.0)}, url)
    first = set(fs.find("/ckptio-marker-test"))
    ckptio.save({"w": torch.full((8,), 2.0)}, url)
    second = set(fs.find("/ckptio-marker-test"))
    assert first & second == {"/ckptio-marker-test/step_1/manifest.json"}
    assert set(ckptio.manifest(url).files) == {p.rsplit("/", 1)[-1] for p in second} - {"manifest.json"}
    dest = {"w": torch.empty(8)}
    ckptio.load(dest, url)
    assert torch.all(dest["w"] == 2.0)
    fs.rm("/ckptio-marker-test", recursive=True)
