"""One rank of the simulated two-node job of ``test_tiered_torchrun.py`` (started by torchrun).

Each torchrun launch is a "node" (``GROUP_RANK``) with its own local directory; the durable tier
is one S3 bucket (moto). ``save`` commits steps 1 and 2 and drains them; ``resume`` restores and
reports, per rank, how many bytes came from each tier.

With a fifth argument ``peer``, the managers replicate each node's files to the other node
(``peer_replication=True``), and ``resume`` refuses (and counts) every read of the durable tier.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
from ckptio.tiered import TieredCheckpointManager

from tests.e2e._ranks import exit_without_finalizing
from tests.tiered._states import check_state, make_state


def _refuse_reads(backend: object, reads: list[str]) -> None:
    """The durable tier is unreachable: every read is recorded, and fails."""

    def refuse(path: str, *args: object, **kwargs: object) -> object:
        reads.append(path)
        raise OSError(f"the durable tier is unreachable ({path})")

    for name in ("open_read", "read_bytes", "read_into"):
        setattr(backend, name, refuse)


def main() -> None:
    mode, root, base, report_dir = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ["RANK"] + " %(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = int(os.environ["GROUP_RANK"])
    local = f"{base}/node{node}"
    peer = sys.argv[5:6] == ["peer"]
    opts = {"peer_replication": True} if peer else {}
    report: dict[str, object] = {"rank": rank, "node": node}
    try:
        if mode == "save":
            with TieredCheckpointManager(root, local=local, async_save=True, **opts) as mgr:
                for step in (1, 2):
                    mgr.save(step, make_state(step, rank, world))
            report["locations"] = {str(k): sorted(v) for k, v in mgr.step_locations().items()}
        else:
            with TieredCheckpointManager(root, local=local, **opts) as mgr:
                if peer:
                    report["durable_reads"] = reads = []
                    _refuse_reads(mgr._durable.backend, reads)
                report["locations"] = {str(k): sorted(v) for k, v in mgr.step_locations().items()}
                state = make_state(0, rank, world, empty=True)
                result = mgr.load(state)
            report.update(step=result.step, tiers=result.tier_bytes, problem=check_state(state, 2, rank))
    finally:
        dist.destroy_process_group()
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    exit_without_finalizing()  # see there: a torch race at exit


if __name__ == "__main__":
    main()
