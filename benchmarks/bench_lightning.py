"""Lightning checkpoint saves: the default ``TorchCheckpointIO`` vs ``CkptioCheckpointIO``.

What a ``Trainer`` pays per checkpoint: the plugin's ``save_checkpoint`` on a Lightning-shaped
checkpoint dict (an LLM-shaped ``state_dict``, ~1 GB by default, plus the usual loop, callback and
hyper-parameter values), the way ``ModelCheckpoint(save_top_k=1)`` calls it (save, then remove
the previous one). Variants, each in a fresh process (``common.run_worker``), ``--saves`` saves:

* ``torch-sync``    ``TorchCheckpointIO``: ``torch.save`` to a temporary file, renamed (no fsync).
* ``ckptio-sync``   ``CkptioCheckpointIO``: a ckptio checkpoint directory, durable (fsync) and
  atomic, checksummed.
* ``torch-async``   Lightning's ``AsyncCheckpointIO(TorchCheckpointIO())``, what Lightning offers
  for background saves: it clones every tensor (fresh memory) on the caller's thread, then queues
  the save on its own thread.
* ``ckptio-async``  ``CkptioCheckpointIO(async_save=True)``: checks the values and copies the
  tensors into host buffers reused from one save to the next (ckptio's ``HostStager``), then
  queues the write on its own thread.
* ``ckptio-async-wrapped``  ``AsyncCheckpointIO(CkptioCheckpointIO())``: ckptio inside Lightning's
  wrapper (the same clone as ``torch-async``), kept for transparency.

Blocked = the time in ``save_checkpoint`` (what training waits for); background = the rest, until
the write is done (``teardown()`` for Lightning's wrapper, ``wait()`` for ``ckptio-async``, which
keeps its buffers for the next save as it does during training). The next save starts once the
previous one is written, as when training between two checkpoints outlasts a background write.

Size: ``--gb`` (default ``$CKPTIO_BENCH_LIGHTNING_GB`` or 1.0, times ``$CKPTIO_BENCH_SCALE``).
``--rounds R`` runs the whole list of variants R times, interleaved, and takes medians over all
rounds (fairer on a shared, loaded machine).
Run: ``.venv/bin/python benchmarks/bench_lightning.py [--gb 1.0] [--saves 3] [--rounds 1]``.
Writes ``benchmarks/results/lightning.md`` and ``lightning.json`` (``--render`` rewrites the
former from the latter). The ratio reported is
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

VARIANTS = ("torch-sync", "ckptio-sync", "torch-async", "ckptio-async", "ckptio-async-wrapped")
HOW = {
    "torch-sync": "`TorchCheckpointIO()` (Lightning's default)",
    "ckptio-sync": "`CkptioCheckpointIO()`",
    "torch-async": "`AsyncCheckpointIO(TorchCheckpointIO())`",
    "ckptio-async": "`CkptioCheckpointIO(async_save=True)`",
    "ckptio-async-wrapped": "`AsyncCheckpointIO(CkptioCheckpointIO())`",
}
FULL_SCALE_GB = common.spec_nbytes(common.llm_spec(1.0)) / common.GB
TARGET = 1.0  # issue 14: ckptio at least as fast as Lightning's default, sync and async (blocked)


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


def make_plugin(variant: str) -> tuple[Any, Any]:
    """``(plugin, wait)``: the plugin a Trainer would get, and how to wait for its write."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    if variant == "ckptio-async":
        from ckptio_lightning import CkptioCheckpointIO

        native = CkptioCheckpointIO(async_save=True)
        return native, native.wait  # keeps the staging buffers, as between two saves in training
    if variant.startswith("ckptio"):
        from ckptio_lightning import CkptioCheckpointIO

        base: Any = CkptioCheckpointIO()
    else:
        base = TorchCheckpointIO()
    if variant.endswith(("async", "async-wrapped")):
        wrapper = AsyncCheckpointIO(base)
        return wrapper, wrapper.teardown  # drains its queue (its executor comes back on the next save)
    return base, None


def _worker(task: dict[str, Any]) -> None:
    import torch

    variant = task["variant"]
    checkpoint = lightning_checkpoint(task["scale"])
    nbytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    work = Path(task["work_dir"]) / f"lightning-{variant}"
    common.remove(work)
    work.mkdir(parents=True)
    plugin, wait = make_plugin(variant)
    blocked: list[float] = []
    background: list[float] = []
    previous: Path | None = None
    for i in range(task["saves"]):
        path = work / f"epoch=0-step={i}.ckpt"
        t0 = time.perf_counter()
        plugin.save_checkpoint(checkpoint, path)
        t1 = time.perf_counter()
        if wait is not None:
            wait()  # the training between two checkpoints
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
    plugin.teardown()  # Lightning's end of fit
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


def merged(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One entry per variant (the schema ``chart.py`` reads): every round's saves in one list,
    the rounds themselves under ``rounds``."""
    out: dict[str, dict[str, Any]] = {}
    for variant, rounds in runs.items():
        good = [r for r in rounds if r.get("ok")]
        out[variant] = {
            "variant": variant,
            "ok": bool(rounds) and len(good) == len(rounds),
            "bytes": good[0]["bytes"] if good else None,
            "blocked_s": [x for r in good for x in r["blocked_s"]],
            "background_s": [x for r in good for x in r["background_s"]],
            "rounds": rounds,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="weights size in GB (default 1.0, see above)")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    ap.add_argument("--work-dir", default=str(common.DEFAULT_WORK_DIR))
    ap.add_argument("--render", action="store_true", help="only rewrite lightning.md from lightning.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    if args.render:
        return rerender()
    gb = args.gb if args.gb is not None else default_gb()
    scale = gb / FULL_SCALE_GB
    facts = common.machine_facts(Path(args.work_dir))
    try:
        import lightning

        facts["lightning"] = lightning.__version__
    except ImportError:
        print("lightning is not installed: pip install -e plugins/lightning")
        return 1
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            task = {"variant": variant, "scale": scale, "saves": args.saves, "work_dir": args.work_dir}
            res = common.run_worker(Path(__file__), task, timeout=900)
            res["round"] = r
            res["loadavg_after"] = common.loadavg()
            runs[variant].append(res)
            if not res.get("ok"):
                print(f"{variant} (round {r + 1}): FAILED {res.get('error')}")
                continue
            print(
                f"{variant} (round {r + 1}): blocked {[f'{x:.3f}' for x in res['blocked_s']]} s, "
                f"background {[f'{x:.3f}' for x in res['background_s']]} s, load {res['loadavg_after']:.2f}"
            )
    facts["loadavg_end"] = common.loadavg()
    return finish(facts, runs, args.saves, args.rounds)


def finish(facts: dict[str, Any], runs: dict[str, list[dict[str, Any]]], saves: int, rounds: int) -> int:
    """Write ``lightning.md`` and ``lightning.json`` from the workers' results; print the summary."""
    md, ratios, lines = report(facts, runs, saves, rounds)
    size_gb = next((r["bytes"] for rs in runs.values() for r in rs if r.get("ok")), 0) / common.GB
    doc = {
        "facts": facts,
        "gb": size_gb,
        "saves": saves,
        "rounds": rounds,
        "ratios": ratios,
        "target": TARGET,
        "results": merged(runs),
    }
    common.write_results("lightning", md, doc)
    print("\n".join(lines))
    return 0 if all(r.get("ok") for rs in runs.values() for r in rs) else 1


def rerender() -> int:
    """``--render``: rewrite ``lightning.md`` from ``lightning.json`` (after editing the text)."""
    doc = json.loads((common.RESULTS_DIR / "lightning.json").read_text())
    runs = {v: list(doc["results"].get(v, {}).get("rounds", [])) for v in VARIANTS}
    return finish(doc["facts"], runs, doc["saves"], doc["rounds"])


def report(
    facts: dict[str, Any], runs: dict[str, list[dict[str, Any]]], saves: int, rounds: int
) -> tuple[str, dict[str, float | None], list[str]]:
    """``(markdown, ratios, lines to print)``."""
    ok = {v: [r for r in runs.get(v, []) if r.get("ok")] for v in VARIANTS}

    def firsts(variant: str, key: str) -> list[float]:
        return [r[key][0] for r in ok[variant]]

    def laters(variant: str, key: str, rs: list[dict[str, Any]] | None = None) -> list[float]:
        # the first save of each process also pays first-touch costs (and allocates the buffers)
        return [x for r in (ok[variant] if rs is None else rs) for x in (r[key][1:] or r[key])]

    def later(variant: str, key: str) -> float | None:
        vals = laters(variant, key)
        return statistics.median(vals) if vals else None

    def total(variant: str) -> float | None:
        sums = [
            b + g
            for r in ok[variant]
            for b, g in zip(r["blocked_s"][1:] or r["blocked_s"], r["background_s"][1:] or r["background_s"])
        ]
        return statistics.median(sums) if sums else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    size_gb = next((r["bytes"] for rs in ok.values() for r in rs), 0) / common.GB
    rows = []
    per_round = []
    for variant in VARIANTS:
        if not ok[variant]:
            rows.append([variant, HOW[variant], "failed", "", "", "", "", ""])
            continue
        b, t = later(variant, "blocked_s"), total(variant)
        rows.append(
            [
                variant,
                HOW[variant],
                common.fmt(statistics.median(firsts(variant, "blocked_s")), 3),
                common.fmt(b, 3),
                common.fmt(max(laters(variant, "blocked_s")), 3),
                common.fmt(later(variant, "background_s"), 3),
                common.fmt(t, 3),
                common.fmt(size_gb / t if t else None, 2),
            ]
        )
        per_round.append(
            f"`{variant}` "
            + ", ".join(
                f"{statistics.median(laters(variant, 'blocked_s', [r])):.3f} s"
                + (f" (load {r['loadavg_after']:.1f})" if r.get("loadavg_after") is not None else "")
                for r in ok[variant]
            )
        )
    table = common.markdown_table(
        [
            "variant",
            "plugin",
            "blocked, 1st save (s)",
            "blocked, later saves, median (s)",
            "blocked, later saves, max (s)",
            "background, median (s)",
            "save total, median (s)",
            "GB/s",
        ],
        rows,
    )
    ratios = {
        "sync": ratio(total("torch-sync"), total("ckptio-sync")),
        "async_blocked": ratio(later("torch-async", "blocked_s"), later("ckptio-async", "blocked_s")),
        "async_blocked_first_save": ratio(
            statistics.median(firsts("torch-async", "blocked_s")) if ok["torch-async"] else None,
            statistics.median(firsts("ckptio-async", "blocked_s")) if ok["ckptio-async"] else None,
        ),
        "async_total": ratio(total("torch-async"), total("ckptio-async")),
        "async_blocked_wrapped": ratio(
            later("torch-async", "blocked_s"), later("ckptio-async-wrapped", "blocked_s")
        ),
        "async_total_wrapped": ratio(total("torch-async"), total("ckptio-async-wrapped")),
    }

    def verdict(x: float | None) -> str:
        return "—" if x is None else ("PASS" if x >= TARGET else "FAIL")

    check = (
        f"Issue 14 target (>= {TARGET:.1f}x): sync save {common.fmt(ratios['sync'])}x "
        f"{verdict(ratios['sync'])}; async time blocked {common.fmt(ratios['async_blocked'])}x "
        f"{verdict(ratios['async_blocked'])}"
    )
    detail = (
        f"TorchCheckpointIO / CkptioCheckpointIO (above 1.0: ckptio is faster): sync save "
        f"{common.fmt(ratios['sync'])}x; async (torch-async vs ckptio-async) time blocked "
        f"{common.fmt(ratios['async_blocked'])}x, first save {common.fmt(ratios['async_blocked_first_save'])}x, "
        f"save total {common.fmt(ratios['async_total'])}x; both in Lightning's AsyncCheckpointIO "
        f"(torch-async vs ckptio-async-wrapped) time blocked {common.fmt(ratios['async_blocked_wrapped'])}x, "
        f"save total {common.fmt(ratios['async_total_wrapped'])}x"
    )
    md = "\n".join(
        [
            "# Lightning: TorchCheckpointIO vs CkptioCheckpointIO",
            "",
            f"A Lightning checkpoint dict with {size_gb:.2f} GB of weights (LLM-shaped, 195 tensors) and the "
            f"usual loop, callback and hyper-parameter values; {saves} saves per process, each variant "
            f"in a fresh process, {rounds} round(s) of all variants interleaved ({saves * rounds} saves per "
            "variant; medians over all rounds), each save followed by the removal of the previous "
            f"checkpoint (top-1). Local disk ({facts.get('work_fs')}); lightning {facts.get('lightning')}, "
            f"torch {facts.get('torch')}, {facts.get('cpus_usable', facts.get('cpus'))} usable CPUs, "
            f"shared with other jobs: load average {common.fmt(facts.get('loadavg_start'))} at start, "
            f"{common.fmt(facts.get('loadavg_end'))} at the end.",
            "",
            table,
            "",
            f"**{check}**",
            "",
            detail + ".",
            "",
            '"Blocked" is what the training thread waits for. `torch-async` and `ckptio-async-wrapped` '
            "run inside Lightning's `AsyncCheckpointIO`, which clones every tensor into fresh memory on the "
            "training thread at every save (allocation and page faults), then queues the save. "
            "`ckptio-async` (`CkptioCheckpointIO(async_save=True)`) checks the values, then copies the tensors "
            "into host buffers it keeps from one save to the next, and queues the write on one background "
            "thread; its first save also allocates those buffers (the 1st-save column). With one save in "
            "flight (the default `max_in_flight=1`) a save waits for the previous write to finish; here "
            "each write finished before the next save, as when training between checkpoints outlasts the "
            "write (the background column).",
            "",
            "Blocked, later saves, median per round (load average after that process): "
            + "; ".join(per_round)
            + ". On a loaded machine a copy's time depends on when its threads are scheduled (torch "
            "copies large tensors with its intra-op thread pool), so single saves vary several-fold; every "
            "save's times are in `lightning.json`.",
            "",
            "TorchCheckpointIO writes one `torch.save` file and renames it, without fsync (a crash can lose "
            "it after the save returned); CkptioCheckpointIO writes a checkpoint directory with "
            "checksums and fsyncs it before committing.",
            "",
        ]
    )
    return md, ratios, [table, check, detail]


if __name__ == "__main__":
    sys.exit(main())
