"""A job SIGKILLed in the middle of a peer replication (two real gloo ranks, each a "node" with
its own local directory).

Node 1 dies while it receives node 0's files of step 2, after part of a file has landed in its
staging directory; the harness then kills node 0, as torchrun does with the rest of a job. The
restarted job must:

* resume from step 2 (committed on both local tiers before the replication began), with the
  saved values;
* never take the half-received copy for a copy: node 1 gets node 0's files of step 2 again from
  node 0, whole, and the staging and lease the dead receiver left are gone;
* go on saving and replicating, with nothing left behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from torch.multiprocessing import ProcessExitedException

from tests.e2e._ranks import run_ranks

pytestmark = [pytest.mark.multirank]

#: bytes per send/recv during these tests (both ranks must agree): a tensor file is many messages
_CHUNK = 16
#: node 1 dies after this many messages of step 2's replication have reached it
_KILL_AFTER = 3


def _options(base: str, rank: int) -> dict[str, Any]:
    from ckptio.retention import KeepLatest

    return {
        "local": str(Path(base) / f"node{rank}"),
        "peer_replication": True,
        "local_retention": KeepLatest(2),
    }


def _killed(rank: int, world: int, base: str) -> None:
    import ckptio.peer
    import torch.distributed as dist
    from ckptio.tiered import TieredCheckpointManager

    from tests.tiered._states import make_state

    ckptio.peer.CHUNK = _CHUNK
    armed = False
    received = 0
    recv = dist.recv

    def recv_then_die(*args: Any, **kwargs: Any) -> Any:
        nonlocal received
        out = recv(*args, **kwargs)
        received += 1
        if armed and received >= _KILL_AFTER:
            # the message landed in the buffer; the bytes before it are in the staged file
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    if rank == 1:
        dist.recv = recv_then_die  # _recv_all looks it up at each call
    with TieredCheckpointManager(
        str(Path(base) / "durable"), async_save=False, **_options(base, rank)
    ) as mgr:
        mgr.save(1, make_state(1, rank, world))
        mgr.wait(durable=True)
        received, armed = 0, True
        try:
            mgr.save(2, make_state(2, rank, world))  # node 1 dies in its replication
        except Exception:  # node 0: its peer is gone
            pass
        if rank == 1:
            raise AssertionError("node 1 should have been killed during the replication of step 2")
        # node 0 stays until the harness kills it, so that node 1's death is the job's one failure
        time.sleep(600)


def _leftovers(root: Path) -> list[str]:
    """Staging directories (and what is in them) and leases under ``root``, relative to it."""
    rel = (str(p.relative_to(root)) for p in root.rglob("*"))
    return sorted(r for r in rel if ".ckptio-partial" in r or r.endswith(".ckptio-lease"))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}


def _restarted(rank: int, world: int, base: str) -> dict[str, Any]:
    import ckptio.peer
    from ckptio.tiered import TieredCheckpointManager

    from tests.tiered._states import check_state, make_state

    ckptio.peer.CHUNK = _CHUNK
    local = Path(base) / f"node{rank}"
    peers = local / "peers" / f"node_{1 - rank:05d}"
    out: dict[str, Any] = {"left_by_kill": _leftovers(local)}
    with TieredCheckpointManager(str(Path(base) / "durable"), **_options(base, rank)) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["resumed"] = (result.step, check_state(state, 2, rank))
        # the copy this node keeps of the other node's step 2, and that node's own files
        out["copy_2"] = _files(peers / "step_00000002")
        out["own_2"] = _files(local / "step_00000002")
        out["left_after_load"] = _leftovers(local)
        mgr.save(3, make_state(3, rank, world))
        mgr.wait(durable=True)
        out["copy_3"] = _files(peers / "step_00000003")
        out["own_3"] = _files(local / "step_00000003")
    out["left_at_end"] = _leftovers(local) + _leftovers(Path(base) / "durable")
    return out


def test_sigkill_during_peer_replication(tmp_path: Path) -> None:
    with pytest.raises(ProcessExitedException) as info:
        run_ranks(_killed, 2, args=(str(tmp_path),), timeout=120)
    assert info.value.error_index == 1 and info.value.signal_name == "SIGKILL", info.value
    # the kill left a half-received copy on node 1 (else this test proves nothing)
    staged = [p for p in (tmp_path / "node1" / "peers").rglob("*") if ".ckptio-partial" in str(p)]
    assert any(p.is_file() and p.stat().st_size > 0 for p in staged), staged

    results = run_ranks(_restarted, 2, args=(str(tmp_path),), timeout=120)
    assert results[1]["left_by_kill"], "node 1's restart found nothing the kill left behind"
    for rank, out in enumerate(results):
        other = results[1 - rank]
        assert out["resumed"] == (2, None), (rank, out["resumed"])
        # the copy is the other node's files, byte for byte, manifest included
        assert out["copy_2"] == other["own_2"] and "manifest.json" in out["copy_2"], rank
        assert out["left_after_load"] == [], (rank, out["left_after_load"])
        assert out["copy_3"] == other["own_3"] and "manifest.json" in out["copy_3"], rank
        assert out["left_at_end"] == [], (rank, out["left_at_end"])
