"""Lightning checkpoint saves: the default ``TorchCheckpointIO`` vs ``CkptioCheckpointIO``.

What a ``Trainer`` pays per checkpoint: the plugin's ``save_checkpoint`` on a Lightning-shaped
checkpoint dict (an LLM-shaped ``state_dict``, ~1 GB by default, plus the usual loop, callback and
hyper-parameter values), the way ``ModelCheckpoint(save_top_k=1)`` calls it (save, then remove
the previous one). Variants, each in a fresh process (``common.run_worker``), ``--saves`` saves:

* ``torch-sync``    ``TorchCheckpointIO``: ``torch.save`` to a temporary file, renamed (no fsync).
* ``ckptio-sync``   ``CkptioCheckpointIO``: a ckptio checkpoint directory, durable (fsync) and
  atomic, checksummed.
* ``torch-async``, ``ckptio-async``: the same inside Lightning's ``AsyncCheckpointIO``. Blocked =
  the time in ``save_checkpoint`` (AsyncCheckpointIO clones every tensor on the caller's thread,
  then queues the save); background = the rest, until the queue is drained.

Size: ``--gb`` (default ``$CKPTIO_BENCH_LIGHTNING_GB`` or 1.0, times ``$CKPTIO_BENCH_SCALE``).
Run: ``.venv/bin/python benchmarks/bench_lightning.py [--gb 1.0] [--saves 3]``.
Writes ``benchmarks/results/lightning.md`` and ``lightning.json``. The ratio reported is
TorchCheckpointIO's time over CkptioCheckpointIO's (above 1.0: ckptio is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

VARIANTS = ("torch-sync", "ckptio-sync", "torch-async", "ckptio-async")
FULL_SCALE_GB = common.spec_nbytes(common.llm_spec(1.0)) / common.GB


def default_gb() -> float:
    raw = os.environ.get("CKPTIO_BENCH_LIGHTNING_GB", "").strip()
    return (float(raw) if raw else 1.0) * common.default_scale()


def lightning_checkpoint(scale: float) -> dict[str, Any]:
    """A checkpoint dict shaped like ``Trainer.save_checkpoint``'s (weights only in the tensors:
    the optimizer state would double the size without changing what is measured)."""
    progress = {"total": {"ready": 10, "completed": 10}, "current": {"ready": 10, "completed": 10}}
    return {
        "epoch": 0,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": common.make_state_dict(scale),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 10},
                "epoch_loop.batch_progress": progress,
                "epoch_progress": progress,
            }
        },
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "dirpath": "/ckpts"}},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"hidden": 2048, "lr": 3e-4, "betas": (0.9, 0.95)},
    }


def _worker(task: dict[str, Any]) -> None:
    import torch
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    variant = task["variant"]
    checkpoint = lightning_checkpoint(task["scale"])
    nbytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    work = Path(task["work_dir"]) / f"lightning-{variant}"
    common.remove(work)
    work.mkdir(parents=True)
    if variant.startswith("ckptio"):
        from ckptio_lightning import CkptioCheckpointIO

        base: Any = CkptioCheckpointIO()
    else:
        base = TorchCheckpointIO()
    is_async = variant.endswith("async")
    plugin: Any = AsyncCheckpointIO(base) if is_async else base
    blocked: list[float] = []
    background: list[float] = []
    previous: Path | None = None
    for i in range(task["saves"]):
        path = work / f"epoch=0-step={i}.ckpt"
        t0 = time.perf_counter()
        plugin.save_checkpoint(checkpoint, path)
        t1 = time.perf_counter()
        if is_async:
            plugin.teardown()  # waits for the queued save: the training between two checkpoints
        t2 = time.perf_counter()
        if previous is not None:
            plugin.remove_checkpoint(previous)  # ModelCheckpoint(save_top_k=1)
        previous = path
        blocked.append(t1 - t0)
        background.append(t2 - t1)
        sd = checkpoint["state_dict"]
        for t in sd.values():  # training changes the weights
            if t.is_floating_point():
                t.view(-1)[:1].add_(1)
    size = sum(f.stat().st_size for f in common.iter_files(work))
    common.remove(work)
    common.emit_result(
        {
            "variant": variant,
            "bytes": nbytes,
            "bytes_on_disk": size,
            "blocked_s": blocked,
            "background_s": background,
            "torch_threads": torch.get_num_threads(),
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="weights size in GB (default 1.0, see above)")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--work-dir", default=str(common.DEFAULT_WORK_DIR))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    gb = args.gb if args.gb is not None else default_gb()
    scale = gb / FULL_SCALE_GB
    facts = common.machine_facts(Path(args.work_dir))
    try:
        import lightning

        facts["lightning"] = lightning.__version__
    except ImportError:
        print("lightning is not installed: pip install -e plugins/lightning")
        return 1
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        task = {"variant": variant, "scale": scale, "saves": args.saves, "work_dir": args.work_dir}
        res = common.run_worker(Path(__file__), task, timeout=900)
        results[variant] = res
        if not res.get("ok"):
            print(f"{variant}: FAILED {res.get('error')}")
            continue
        print(
            f"{variant}: blocked {[f'{x:.3f}' for x in res['blocked_s']]} s, "
            f"background {[f'{x:.3f}' for x in res['background_s']]} s"
        )

    def later(variant: str, key: str) -> float | None:
        res = results.get(variant, {})
        if not res.get("ok"):
            return None
        vals = res[key][1:] or res[key]  # the first save also pays first-touch costs
        return statistics.median(vals)

    def total(variant: str) -> float | None:
        b, g = later(variant, "blocked_s"), later(variant, "background_s")
        return None if b is None or g is None else b + g

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    size_gb = next((r["bytes"] for r in results.values() if r.get("ok")), 0) / common.GB
    rows = []
    for variant in VARIANTS:
        res = results[variant]
        if not res.get("ok"):
            rows.append([variant, "failed", "", "", "", ""])
            continue
        b, t = later(variant, "blocked_s"), total(variant)
        rows.append(
            [
                variant,
                common.fmt(res["blocked_s"][0], 3),
                common.fmt(b, 3),
                common.fmt(later(variant, "background_s"), 3),
                common.fmt(t, 3),
                common.fmt(size_gb / t if t else None, 2),
            ]
        )
    table = common.markdown_table(
        [
            "variant",
            "blocked, 1st save (s)",
            "blocked, later saves, median (s)",
            "background, median (s)",
            "save total, median (s)",
            "GB/s",
        ],
        rows,
    )
    ratios = {
        "sync": ratio(total("torch-sync"), total("ckptio-sync")),
        "async_blocked": ratio(later("torch-async", "blocked_s"), later("ckptio-async", "blocked_s")),
        "async_total": ratio(total("torch-async"), total("ckptio-async")),
    }
    summary = (
        f"TorchCheckpointIO / CkptioCheckpointIO: sync save {common.fmt(ratios['sync'])}x, "
        f"async time blocked {common.fmt(ratios['async_blocked'])}x, "
        f"async save total {common.fmt(ratios['async_total'])}x (above 1.0: ckptio is faster)"
    )
    md = "\n".join(
        [
            "# Lightning: TorchCheckpointIO vs CkptioCheckpointIO",
            "",
            f"A Lightning checkpoint dict with {size_gb:.2f} GB of weights (LLM-shaped, 195 tensors) and the "
            f"usual loop, callback and hyper-parameter values; {args.saves} saves per variant, each variant "
            f"in a fresh process, each save followed by the removal of the previous checkpoint (top-1). "
            f"Local disk ({facts.get('work_fs')}); lightning {facts.get('lightning')}, torch {facts.get('torch')}, "
            f"{facts.get('cpus_usable', facts.get('cpus'))} usable CPUs; load average at start "
            f"{facts.get('loadavg_start')}.",
            "",
            table,
            "",
            f"**{summary}**",
            "",
            "TorchCheckpointIO writes one `torch.save` file and renames it, without fsync (a crash can lose "
            "it after the save returned); CkptioCheckpointIO writes a checkpoint directory with "
            "checksums and fsyncs it before committing. In the async variants both run inside Lightning's "
            '`AsyncCheckpointIO`, which clones every tensor on the training thread before queueing the save: "blocked" '
            "is that clone for both, so the async blocked ratio is about 1.0 by construction; the write itself "
            "runs in the background.",
            "",
        ]
    )
    common.write_results(
        "lightning",
        md,
        {"facts": facts, "gb": size_gb, "saves": args.saves, "ratios": ratios, "results": results},
    )
    print(table)
    print(summary)
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
