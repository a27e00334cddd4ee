"""``ckptio demo``: train, checkpoint, crash, resume, and prove the resume is exact.

1. Train a tiny causal transformer language model (pure torch, CPU, synthetic data) for
   ``--steps`` steps without interruption, recording the loss of every step.
2. In a child process, train again from scratch, checkpointing model, optimizer, step and RNG
   every ``--every`` steps through a :class:`~ckptio.CheckpointManager`, and kill it with
   SIGKILL at ``--crash-at``.
3. In a new child process, resume from the latest committed checkpoint and train to the end.
4. Compare: the resumed losses must equal the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 256, 64, 4, 2, 32, 16


class TinyLM(nn.Module):
    """A small decoder-only transformer with tied input/output embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        layer = nn.TransformerEncoderLayer(
            DIM, HEADS, 4 * DIM, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in most LMs
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.lm_head(self.norm(h))


def _batch() -> torch.Tensor:
    # a learnable synthetic language: each token is the previous one plus a small random step
    start = torch.randint(0, VOCAB, (BATCH, 1))
    steps = torch.randint(0, 3, (BATCH, SEQ))
    return (start + steps.cumsum(1)) % VOCAB


def _setup() -> tuple[TinyLM, torch.optim.Optimizer, Any]:
    torch.manual_seed(1234)
    model = TinyLM()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 20))
    return model, optim, sched


def _train_step(model: TinyLM, optim: torch.optim.Optimizer, sched: Any) -> float:
    tokens = _batch()
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()
    return float(loss.item())


def _progress(total: int, initial: int, desc: str) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit="step", leave=False, disable=None, file=sys.stderr
        )
    except ImportError:  # pragma: no cover
        return None


def train(
    url: str | None, steps: int, every: int, crash_at: int | None, stats_path: str | None
) -> dict[str, Any]:
    """Train (resuming from ``url`` when it has a checkpoint); return losses and I/O stats."""
    import ckptio

    torch.set_num_threads(1)  # bit-exact runs need the same reduction order every time
    model, optim, sched = _setup()
    state: dict[str, Any] = {
        "model": ckptio.ModelState(model),
        "optim": ckptio.OptimizerState(model, optim, sched),
        "rng": ckptio.RNGState(),
        "step": 0,
    }
    losses: dict[int, float] = {}
    stats: dict[str, Any] = {"saves": [], "load": None, "resumed_from": None}
    manager = ckptio.CheckpointManager(url, retention=ckptio.KeepLatest(3)) if url else None
    start = 0
    if manager is not None and manager.latest_step() is not None:
        loaded = manager.load(state)
        start = int(state["step"])
        stats["load"] = {"bytes": loaded.bytes, "seconds": loaded.seconds}
        stats["resumed_from"] = start
    bar = _progress(steps, start, "resumed" if start else "training")
    for step in range(start + 1, steps + 1):
        losses[step] = _train_step(model, optim, sched)
        state["step"] = step
        if manager is not None and step % every == 0:
            r = manager.save(step, state, metrics={"loss": losses[step]})
            if r is not None:
                stats["saves"].append({"step": step, "bytes": r.bytes, "seconds": r.seconds})
            if stats_path:
                with open(stats_path, "w") as f:
                    json.dump({"losses": losses, **stats}, f)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[step]:.3f}")
        if crash_at is not None and step == crash_at:
            if bar is not None:
                bar.close()
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no flush
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.close()
        stats["steps_saved"] = manager.steps()
    out = {"losses": losses, **stats}
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(out, f)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="./ckptio-demo", help="where to checkpoint (any ckptio URL)")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument(
        "--crash-at", type=int, default=None, help="step at which to kill the run (default: 73%%)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _clear(url: str) -> None:
    """Start from an empty series, refusing to delete anything that is not a ckptio series."""
    from .checkpoint import open_backend

    u, backend = open_backend(url)
    names = backend.listdir(u.path)
    foreign = [n for n in names if not (n == "latest" or n.lstrip(".").startswith("step_"))]
    if foreign:
        raise SystemExit(
            f"ckptio demo: {u} holds files that are not a ckptio series ({foreign[:3]}); pick another --url"
        )
    backend.remove(u.path, recursive=True)


def _child(url: str, steps: int, every: int, crash_at: int | None, stats_path: str) -> int:
    cmd = [
        sys.executable,
        "-m",
        "ckptio.demo",
        "--url",
        url,
        "--steps",
        str(steps),
        "--every",
        str(every),
        "--stats",
        stats_path,
    ]
    if crash_at is not None:
        cmd += ["--crash-at", str(crash_at)]
    return subprocess.run(cmd).returncode


def run(args: argparse.Namespace) -> int:
    steps, every = args.steps, args.every
    crash_at = args.crash_at if args.crash_at is not None else max(every + 1, int(steps * 0.73))
    if not (every < crash_at < steps):
        print("ckptio demo: need --every < --crash-at < --steps", file=sys.stderr)
        return 2
    _clear(args.url)
    t0 = time.perf_counter()
    print(
        f"ckptio demo: {steps} steps of a tiny transformer LM, checkpoint every {every} to {args.url}",
        file=sys.stderr,
    )
    print("1/3 uninterrupted reference run", file=sys.stderr)
    reference = train(None, steps, every, None, None)["losses"]
    with tempfile.TemporaryDirectory() as tmp:
        first, second = os.path.join(tmp, "first.json"), os.path.join(tmp, "second.json")
        print(f"2/3 checkpointed run, killed with SIGKILL at step {crash_at}", file=sys.stderr)
        rc = _child(args.url, steps, every, crash_at, first)
        if rc != -signal.SIGKILL:
            print(f"ckptio demo: the crashing run exited with {rc}, expected SIGKILL", file=sys.stderr)
            return 1
        print("3/3 new process resumes from the latest checkpoint", file=sys.stderr)
        if _child(args.url, steps, every, None, second) != 0:
            print("ckptio demo: the resumed run failed", file=sys.stderr)
            return 1
        with open(first) as f:
            crashed = json.load(f)
        with open(second) as f:
            resumed = json.load(f)
    start = int(resumed["resumed_from"] or 0)
    compared = {int(k): v for k, v in resumed["losses"].items()}
    exact = start > 0 and all(compared[s] == reference[s] for s in range(start + 1, steps + 1))
    saves = crashed["saves"] + resumed["saves"]
    save_bytes = sum(s["bytes"] for s in saves)
    save_secs = sum(s["seconds"] for s in saves)
    load = resumed["load"] or {"bytes": 0, "seconds": 0}
    summary = {
        "url": args.url,
        "steps": steps,
        "crashed_at": crash_at,
        "resumed_from": start,
        "bit_exact": exact,
        "max_abs_loss_diff": max(
            (abs(compared[s] - reference[s]) for s in range(start + 1, steps + 1)), default=math.nan
        ),
        "checkpoints_saved": len(saves),
        "steps_kept": resumed.get("steps_saved"),
        "bytes_per_checkpoint": saves[-1]["bytes"] if saves else 0,
        "save_MBps": save_bytes / save_secs / 1e6 if save_secs else 0.0,
        "load_MBps": load["bytes"] / load["seconds"] / 1e6 if load.get("seconds") else 0.0,
        "save_ms": 1000 * save_secs / len(saves) if saves else 0.0,
        "load_ms": 1000 * float(load.get("seconds") or 0.0),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print()
        print("ckptio demo summary")
        print(f"  checkpoint URL         {summary['url']}")
        print(
            f"  crash                  SIGKILL at step {crash_at}; resumed from step {start} in a new process"
        )
        print(
            f"  checkpoints saved      {summary['checkpoints_saved']} ({summary['bytes_per_checkpoint'] / 1e6:.2f} MB each), "
            f"kept by retention: {summary['steps_kept']}"
        )
        print(
            f"  save throughput        {summary['save_MBps']:.1f} MB/s, {summary['save_ms']:.0f} ms per checkpoint "
            "(durable: fsync + atomic commit; tiny checkpoints are latency-bound)"
        )
        print(
            f"  load throughput        {summary['load_MBps']:.1f} MB/s, {summary['load_ms']:.0f} ms (checksums verified)"
        )
        verdict = (
            "IDENTICAL, bit for bit" if exact else f"DIFFERENT (max diff {summary['max_abs_loss_diff']:.3g})"
        )
        print(f"  resumed losses         {verdict} vs the uninterrupted run (steps {start + 1}..{steps})")
        print(f"  total time             {summary['seconds']} s")
    return 0 if exact else 1


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptio.demo")
    add_arguments(parser)
    parser.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stats:  # child mode
        train(args.url, args.steps, args.every, args.crash_at, args.stats)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(_main())
