"""Peer replication (``TieredCheckpointManager(..., peer_replication=True)``) on two real ranks
(gloo), each rank a "node" with a local directory of its own.

Each node's files of every step are copied to the other node's ``<local>/peers/``; after node 1
loses its local disk, and with the durable tier gone (its directory deleted, reads refused), the
run resumes from node 0's copy of node 1's files. A damaged peer copy is rejected on receipt and
the replaced node reads from the durable tier instead.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from ckptio.errors import OptionError
from ckptio.tiered import TieredCheckpointManager

from tests.e2e._ranks import run_ranks

pytestmark = [pytest.mark.multirank]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _refuse_durable_reads(mgr: Any, reads: list[str]) -> None:
    """The durable tier is unreachable: every read of it is recorded and fails."""
    backend = mgr._durable.backend

    def refuse(name: str) -> Any:
        def fn(path: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(f"{name} {path}")
            raise OSError(f"the durable tier is unreachable ({path})")

        return fn

    for name in ("open_read", "read_bytes", "read_into"):
        setattr(backend, name, refuse(name))


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _body(rank: int, world: int, base: str) -> dict[str, Any]:
    import torch.distributed as dist
    from ckptio.retention import KeepLatest

    from tests.tiered._states import check_state, make_state

    logging.basicConfig(level=logging.WARNING)
    records = _Records()
    logging.getLogger("ckptio").addHandler(records)
    local, durable = Path(base) / f"node{rank}", Path(base) / "durable"
    opts: dict[str, Any] = {"local": str(local), "peer_replication": True, "local_retention": KeepLatest(2)}
    out: dict[str, Any] = {}

    def barrier_then(fn: Any) -> None:
        dist.barrier()
        fn()
        dist.barrier()

    with TieredCheckpointManager(str(durable), async_save=True, **opts) as mgr:
        for step in (1, 2, 3):
            assert mgr.save(step, make_state(step, rank, world)) is None
        mgr.wait(durable=True)
    # node r keeps node 1-r's files of the steps it keeps itself (local retention: the last 2)
    peers = local / "peers" / f"node_{1 - rank:05d}"
    out["peer_steps"] = sorted(p.name for p in peers.iterdir())
    out["peer_files"] = _tree(peers / "step_00000003")
    out["own_files"] = _tree(local / "step_00000003")

    # 1. node 1 is replaced, and node 0's copy of node 1's files is damaged: node 1 reads from durable
    def damage() -> None:
        if rank == 1:
            shutil.rmtree(local)
        else:
            f = max((peers / "step_00000003").glob("*.bin"), key=lambda p: p.stat().st_size)
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))

    barrier_then(damage)
    records.messages.clear()
    with TieredCheckpointManager(str(durable), **opts) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["damaged"] = (result.step, dict(result.tier_bytes), check_state(state, 3, rank))
        out["damaged_warnings"] = [m for m in records.messages if "peer copy" in m]
        # the copy node 1 keeps of node 0's files was sent again, damage elsewhere notwithstanding
        out["kept_again"] = (
            local / "peers" / f"node_{1 - rank:05d}" / "step_00000003" / "manifest.json"
        ).exists()
        # the run goes on: step 4 is committed and replicated on both nodes again
        mgr.save(4, make_state(4, rank, world))
        mgr.wait(durable=True)

    # 2. node 1 is replaced again, and the durable tier is gone: node 1 restores from its peer
    def lose() -> None:
        if rank == 1:
            shutil.rmtree(local)
        else:
            shutil.rmtree(durable)

    barrier_then(lose)
    reads: list[str] = []
    with TieredCheckpointManager(str(durable), **opts) as mgr:
        _refuse_durable_reads(mgr, reads)
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["restored"] = (result.step, dict(result.tier_bytes), check_state(state, 4, rank))
        out["locations"] = mgr.step_locations()
    out["durable_reads"] = reads
    return out


def test_peer_replication_restores_a_lost_node_without_the_durable_tier(tmp_path: Path) -> None:
    results = run_ranks(_body, 2, args=(str(tmp_path),), timeout=240)
    for rank, out in enumerate(results):
        # retention removed the peer copy of step 1 with the local one
        assert out["peer_steps"] == ["step_00000002", "step_00000003"], rank
        other = results[1 - rank]["own_files"]
        assert out["peer_files"] == other and "manifest.json" in other, rank
        step, tiers, problem = out["damaged"]
        assert (step, problem) == (3, None), rank
        if rank == 1:  # the damaged peer copy was refused: its bytes came from the durable tier
            assert tiers["durable"] > 0, tiers
            assert any("damaged" in m for m in out["damaged_warnings"]), out["damaged_warnings"]
            assert out["kept_again"]
        step, tiers, problem = out["restored"]
        assert (step, problem) == (4, None), rank
        assert tiers["durable"] == 0 and tiers["local"] > 0, (rank, tiers)
        assert out["durable_reads"] == [], rank
        assert out["locations"][4] == {"local"}, out["locations"]


def test_peer_replication_option(tmp_path: Path) -> None:
    with pytest.raises(OptionError):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replicaton=True)
    with pytest.raises(ValueError):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=1)  # type: ignore[arg-type]
    # one process, one node: nothing to replicate to, and nothing else changes
    from tests.tiered._states import check_state, make_state

    with TieredCheckpointManager(
        str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=True
    ) as mgr:
        mgr.save(1, make_state(1, 0, 1))
        mgr.wait(durable=True)
        state = make_state(0, 0, 1, empty=True)
        assert mgr.load(state).source == "local" and check_state(state, 1, 0) is None
    assert not (tmp_path / "l" / "peers").exists()
