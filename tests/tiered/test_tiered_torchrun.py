"""Two simulated nodes on this machine: two ``torchrun --nnodes=2 --nproc-per-node=2`` launches
joined by a static rendezvous on 127.0.0.1, each node with its own local directory, one S3 (moto)
durable tier. Node 1 is then replaced (its directory deleted): on resume node 0's ranks read their
own copies, node 1's read from S3, and every rank gets its exact state back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._ranks import free_port

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NODES, PER_NODE = 2, 2


def _launch(mode: str, root: str, base: Path, reports: Path, timeout: float = 300, *extra: str) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKPTIO_PROGRESS": "0"}
    procs = []
    for node in range(NODES):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={NODES}",
            f"--nproc-per-node={PER_NODE}",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "tests.tiered.torchrun_worker",
            mode,
            root,
            str(base),
            str(reports),
            *extra,
        ]
        log = (base.parent / f"{mode}-node{node}.log").open("wb")
        procs.append(
            (
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: our own session
                proc.wait(30)
            log.close()
    for node, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (base.parent / f"{mode}-node{node}.log").read_text()[-4000:]


def _reports(reports: Path) -> list[dict[str, Any]]:
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]


def test_two_nodes_of_two_ranks_with_node_replacement(tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    from tests.tiered._states import COLS, ROWS_PER_RANK

    root, base = f"s3://{s3_bucket}/run", tmp_path / "disks"
    _launch("save", root, base, tmp_path / "saved")
    for rep in _reports(tmp_path / "saved"):
        assert rep["locations"] == {"1": ["durable", "local"], "2": ["durable", "local"]}, rep
    assert sorted(p.name for p in base.iterdir()) == ["node0", "node1"]
    shutil.rmtree(base / "node1")  # node 1 is replaced by a machine with an empty disk
    _launch("resume", root, base, tmp_path / "resumed")
    own = ROWS_PER_RANK * COLS * 4 + 3 * 4
    for rep in _reports(tmp_path / "resumed"):
        assert (rep["step"], rep["problem"]) == (2, None), rep
        tiers = rep["tiers"]
        if rep["node"] == 0:
            assert rep["locations"] == {"1": ["durable", "local"], "2": ["durable", "local"]}, rep
            assert tiers["local"] >= own and tiers["durable"] < own, rep
        else:
            assert rep["locations"] == {"1": ["durable"], "2": ["durable"]}, rep
            assert tiers["local"] == 0 and tiers["durable"] >= own, rep


def test_peer_replication_restores_a_replaced_node_without_the_durable_tier(tmp_path: Path) -> None:
    """The same two nodes with ``peer_replication=True``: node 1 is replaced *and* the durable tier
    is gone (its directory deleted, every read refused): node 1's ranks get their files back from
    node 0's copy, over the process group."""
    root, base = str(tmp_path / "durable"), tmp_path / "disks"
    _launch("save", root, base, tmp_path / "saved", 300, "peer")
    assert sorted(p.name for p in (base / "node0" / "peers" / "node_00001").iterdir()) == [
        "step_00000001",
        "step_00000002",
    ]
    shutil.rmtree(base / "node1")
    shutil.rmtree(root)
    _launch("resume", root, base, tmp_path / "resumed", 300, "peer")
    for rep in _reports(tmp_path / "resumed"):
        assert (rep["step"], rep["problem"]) == (2, None), rep
        assert rep["durable_reads"] == [] and rep["tiers"]["durable"] == 0 and rep["tiers"]["local"] > 0, rep
    # node 1 holds its own copy of step 2 again, and its copy of node 0's files
    assert (base / "node1" / "step_00000002" / "manifest.json").exists()
    assert (base / "node1" / "peers" / "node_00000" / "step_00000002" / "manifest.json").exists()
