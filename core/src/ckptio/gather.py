"""Full (unsharded) copies of possibly-sharded tensors, for addons that export single files.

Addons such as ``peft`` (adapter files) and ``consolidated-hf`` (HF export) must turn FSDP2/DTensor
shards into whole tensors. ``DTensor.full_tensor()`` would do, but it runs its collective on the
tensor's device-mesh group, i.e. the *training* process group; when the manager saves in the
background that would interleave with training collectives (a known source of hangs). So for
the common layouts (a 1-D mesh, ``Shard(d)`` or ``Replicate``) the shards are gathered over the
process group ckptio was given for this operation (``AddonContext.process_group``), which the
manager makes a dedicated group for background saves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import _dist


def _group_ranks(pg: Any) -> list[int]:
    if pg is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(pg))


def full_tensor(t: torch.Tensor, pg: Any = None) -> torch.Tensor:
    """The whole of ``t`` on the CPU, on every rank of ``pg`` (a collective when ``t`` is sharded).

    Plain tensors are returned detached on the CPU without communication. Every rank must call
    this for the same tensors in the same order.
    """
    if not isinstance(t, DTensor):
        return t.detach().cpu()
    mesh = t.device_mesh
    placement = t.placements[0] if len(t.placements) == 1 else None
    same_group = mesh.ndim == 1 and _dist.active(pg) and mesh.mesh.flatten().tolist() == _group_ranks(pg)
    if isinstance(placement, Replicate):
        return t.to_local().detach().cpu()
    if isinstance(placement, Shard) and same_group:
        parts = _dist.all_gather(t.to_local().detach().cpu(), pg)
        return torch.cat(parts, dim=placement.dim)
    return t.full_tensor().detach().cpu()  # other layouts: torch's collective on the mesh group
