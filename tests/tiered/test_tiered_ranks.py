"""TieredCheckpointManager on two real ranks (gloo): one shared local directory, then one per "node".

With one directory per rank, each rank is a node of its own: it commits its own copy of every
step (its files and the manifest), and after its directory is deleted (a replaced node) it reads
from the durable tier while the other rank keeps reading its own local copy.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._ranks import run_ranks

pytestmark = [pytest.mark.multirank]


def _body(rank: int, world: int, base: str, shared: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from ckptio.tiered import TieredCheckpointManager

    from tests.tiered._states import check_state, make_state

    logging.basicConfig(level=logging.WARNING)
    local = f"{base}/local" if shared else f"{base}/node{rank}"
    durable = f"{base}/durable"
    out: dict[str, Any] = {}
    with TieredCheckpointManager(durable, local=local, async_save=True) as mgr:
        for step in (1, 2):
            assert mgr.save(step, make_state(step, rank, world)) is None
        mgr.wait(durable=True)
        out["locations"] = mgr.step_locations()
    with TieredCheckpointManager(durable, local=local) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["resume"] = (result.step, result.tier_bytes, check_state(state, 2, rank))
    if shared:
        return out
    dist.barrier()
    if rank == 1:  # node 1 was replaced: its local disk is empty
        shutil.rmtree(local)
    dist.barrier()
    with TieredCheckpointManager(durable, local=local) as mgr:
        out["after_replace_locations"] = mgr.step_locations()
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["replaced"] = (result.step, result.tier_bytes, check_state(state, 2, rank))
        mgr.save(3, make_state(3, rank, world))  # the run goes on: both nodes commit step 3
        mgr.wait(durable=True)
        out["after_save_locations"] = mgr.step_locations()
    # rank 0's copy of step 3 is damaged: rank 0 reads that file from the durable tier
    dist.barrier()
    if rank == 0:
        f = max((Path(local) / "step_00000003").glob("*.bin"), key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    dist.barrier()
    with TieredCheckpointManager(durable, local=local) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["corrupt"] = (result.step, result.tier_bytes, result.fallbacks, check_state(state, 3, rank))
    return out


def test_two_ranks_one_shared_local_directory(tmp_path: Path) -> None:
    results = run_ranks(_body, 2, args=(str(tmp_path), True), timeout=240)
    for rank, out in enumerate(results):
        assert out["locations"] == {1: {"local", "durable"}, 2: {"local", "durable"}}
        step, tiers, problem = out["resume"]
        assert (step, problem) == (2, None), rank
        assert tiers["local"] > 0 and tiers["durable"] == 0, (rank, tiers)


def test_two_nodes_with_a_replaced_node(tmp_path: Path) -> None:
    from tests.tiered._states import COLS, ROWS_PER_RANK

    own = ROWS_PER_RANK * COLS * 4 + 3 * 4  # this rank's shard and per-rank tensor (float32)
    replicated = 5 * 4 + 64  # values DCP stores once, in some rank's file (the other node's, maybe)
    results = run_ranks(_body, 2, args=(str(tmp_path), False), timeout=300)
    for rank, out in enumerate(results):
        assert out["locations"] == {1: {"local", "durable"}, 2: {"local", "durable"}}
        step, tiers, problem = out["resume"]
        # each node reads what it wrote from its own disk; what the other node wrote, from the durable tier
        assert (step, problem) == (2, None) and tiers["local"] >= own, (rank, tiers)
        assert tiers["durable"] <= replicated, (rank, tiers)
        step, tiers, problem = out["replaced"]
        assert (step, problem) == (2, None), rank
        if rank == 0:  # the surviving node reads its own copy
            assert tiers["local"] >= own and tiers["durable"] <= replicated, tiers
        else:  # the replaced one reads everything from the durable tier
            assert tiers["local"] == 0 and tiers["durable"] >= own, tiers
        assert out["after_save_locations"][3] == {"local", "durable"}
        step, tiers, fallbacks, problem = out["corrupt"]
        assert (step, problem) == (3, None), rank
        if rank == 0:
            assert len(fallbacks) == 1 and tiers["durable"] >= ROWS_PER_RANK * COLS * 4, (fallbacks, tiers)
        else:
            assert fallbacks == [] and tiers["local"] >= own, (fallbacks, tiers)
    # node 1 lost steps 1 and 2; node 0 still holds them
    assert results[1]["after_replace_locations"] == {1: {"durable"}, 2: {"durable"}}
    assert results[0]["after_replace_locations"] == {1: {"local", "durable"}, 2: {"local", "durable"}}
