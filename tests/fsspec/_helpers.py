"""Shared by the fsspec and msc backend tests: a reference state and the bodies run on spawned ranks.

Rank bodies are top-level functions (spawn pickles them by name). Each takes a list of
``(url, storage_options)`` so that one spawn covers every store under test: spawning ranks costs
seconds (torch import), the checkpoints themselves are small.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import ckptio
import torch

# ranks load only the plugins these tests need: importing every installed plugin costs seconds per rank
RANK_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "CKPTIO_PLUGINS": "native,local,fsspec,msc,safetensors",
}
Target = tuple[str, dict[str, Any]]


def reference(rows: int = 64, cols: int = 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {"w": torch.randn(rows, cols, generator=g), "b": torch.arange(rows, dtype=torch.int64)}


def plain_state(step: int = 7) -> dict[str, Any]:
    ref = reference()
    return {"w": ref["w"].clone(), "b": ref["b"].clone(), "step": step}


def empty_plain() -> dict[str, Any]:
    ref = reference()
    return {"w": torch.zeros_like(ref["w"]), "b": torch.zeros_like(ref["b"]), "step": 0}


def check_plain(state: dict[str, Any], step: int = 7) -> None:
    ref = reference()
    assert torch.equal(state["w"], ref["w"])
    assert torch.equal(state["b"], ref["b"])
    assert state["step"] == step


def _mesh(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def save_sharded(rank: int, world: int, targets: list[Target]) -> bool:
    """Save ``w`` as a DTensor sharded on dim 0 over all ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh(world)
    ref = reference()
    for url, opts in targets:
        state = {"w": distribute_tensor(ref["w"], mesh, [Shard(0)]), "b": ref["b"].clone(), "step": 7}
        ckptio.save(state, url, storage_options=opts)
    return True


def load_sharded(rank: int, world: int, targets: list[Target]) -> list[bool]:
    """Load into a DTensor sharded on dim 0 and compare the full tensor with the reference."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh(world)
    ref = reference()
    ok = []
    for url, opts in targets:
        state = {
            "w": distribute_tensor(torch.zeros_like(ref["w"]), mesh, [Shard(0)]),
            "b": torch.zeros(64, dtype=torch.int64),
            "step": 0,
        }
        ckptio.load(state, url, storage_options=opts)
        ok.append(
            bool(
                torch.equal(state["w"].full_tensor(), ref["w"])
                and torch.equal(state["b"], ref["b"])
                and state["step"] == 7
            )
        )
    return ok


def save_then_load_sharded(
    rank: int, world: int, save_to: list[Target], load_from: list[Target]
) -> list[bool]:
    """One spawn for both directions (spawning ranks is the slow part): N-rank save, N-rank load."""
    save_sharded(rank, world, save_to)
    return load_sharded(rank, world, load_from)


THRESHOLD_CASES = [(10 * (1 << 20), 0), (10 * (1 << 20) + 1, 3), (3 * (1 << 20), 0)]


def check_put_or_multipart(
    be: Any, path: str, client: Any, bucket: str, key: str, size: int, parts: int
) -> None:
    """Stream ``size`` bytes to ``path`` in 2 MiB writes through a backend with 5 MiB parts and the
    default threshold (two parts): ``parts == 0`` expects one PutObject, else a multipart upload of
    ``parts`` parts (S3's ETag for those ends in ``-<parts>``). The bytes must read back equal."""
    payload = os.urandom(size)
    with be.open_write(path) as f:
        for i in range(0, size, 2 << 20):
            f.write(payload[i : i + (2 << 20)])
    etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith(f"-{parts}") if parts else "-" not in etag
    assert be.read_bytes(path) == payload
