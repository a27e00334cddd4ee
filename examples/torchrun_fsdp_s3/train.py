"""Train a small model with FSDP2 under torchrun and checkpoint it to S3 (or any ckptio URL).

    torchrun --nproc-per-node 2 examples/torchrun_fsdp_s3/train.py --url s3://bucket/runs/demo

Runs on CPU with gloo (no GPU needed) or on GPUs with nccl. Re-running the same command resumes
from the newest committed step: model, optimizer, learning-rate schedule, step counter and each
rank's RNG, resharded if the number of ranks changed.

Storage options reach the backend from ``--storage-options '{"key": ...}'`` or from the
environment: ``S3_ENDPOINT_URL`` (e.g. a local MinIO or moto server) plus the usual ``AWS_*``
variables, which s3fs reads itself.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import ckptio
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


def build_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)  # every rank starts from the same weights
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(args.storage_options) if args.storage_options else {}
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    if endpoint and args.url.startswith(("s3://", "safetensors+s3://")):
        opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
    return opts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="checkpoint root, e.g. s3://bucket/runs/demo or ./ckpts")
    p.add_argument("--steps", type=int, default=20, help="train until this step")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--keep", type=int, default=2, help="committed steps to keep")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    p.add_argument("--storage-options", default=None, help="JSON object passed to the storage backend")
    args = p.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    model = build_model(args.width, args.depth).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)  # parameters are now DTensors, one shard per rank
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

    state = {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, opt, sched),
        "rng": ckptio.RNGState(),  # per rank: each rank keeps its own stream
        "step": 0,
    }
    with ckptio.CheckpointManager(
        args.url,
        retention=ckptio.KeepLatest(args.keep),
        async_save=args.async_save,
        storage_options=storage_options(args),
    ) as mgr:
        if mgr.latest_step() is not None:
            result = mgr.load(state)
            if rank == 0:
                print(
                    f"resumed from step {state['step']} ({result.bytes / 1e6:.2f} MB, {world} ranks)",
                    flush=True,
                )
        else:
            torch.manual_seed(1000 + rank)  # fresh run: each rank draws its own data
        while state["step"] < args.steps:
            x = torch.randn(32, args.width, device=device)
            y = x.sum(dim=1, keepdim=True).tanh()
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            state["step"] += 1
            if state["step"] % args.save_every == 0 or state["step"] == args.steps:
                mgr.save(
                    state["step"], state, metrics={"loss": loss.item()}, final=state["step"] == args.steps
                )
                if rank == 0:
                    print(f"step {state['step']}: loss {loss.item():.4f}, checkpoint saved", flush=True)
        mgr.wait()
        if rank == 0:
            print(f"done: steps {mgr.steps()} under {args.url}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
