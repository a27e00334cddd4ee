"""Draw ``benchmarks/results/throughput.png`` from the JSON files the benchmark modules write.

One panel per benchmark file and operation (save, cold load, warm load...): a horizontal bar per
method with its median throughput in GB/s, ckptio's bars highlighted, each bar labelled with its
ratio to the best non-ckptio peer of the panel, and the machine's own limit (``dd`` to disk, ``dd``
from a cold or warm page cache, memcpy) drawn as a dashed line with ckptio's fraction of it.

Reads the schemas the harness writes today: ``summary`` tables (``{method: {"gbps_med", "n"}}``,
``bench_local``/``bench_safetensors``), ``results`` per method and operation with ``best_mib_s``
(``bench_cloud``) and background-save results with ``blocked_s`` (``bench_async``, shown as
GB/s of training time blocked). Anything else is skipped with a note.

    python benchmarks/chart.py [--results benchmarks/results] [--out benchmarks/results/throughput.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"

#: reference rows of bench_local: which limit applies to which operation
LIMITS = {"save": "ref:dd_write", "load cold": "ref:dd_read_cold", "load warm": "ref:memcpy"}
LIMIT_LABEL = {"ref:dd_write": "dd fdatasync", "ref:dd_read_cold": "dd cold read", "ref:memcpy": "memcpy"}

Panel = dict[str, Any]  # {"title", "bars": {method: GB/s}, "limit": (label, GB/s) | None}


def _op_of(method: str) -> str:
    name = method.lower()
    temp = " cold" if name.endswith(":cold") else " warm" if name.endswith(":warm") else ""
    if "consolidate" in name:
        return "consolidate"
    if "save" in name:
        return "save"
    if "load" in name:
        return "load" + temp
    return "other"


def panels_from_summary(name: str, doc: dict[str, Any]) -> list[Panel]:
    """``{"summary": {method: {"gbps_med": x, "n": k}}}`` -> one panel per operation."""
    summary = doc["summary"]
    by_op: dict[str, dict[str, float]] = {}
    for method, row in summary.items():
        if not isinstance(row, dict) or method.startswith("ref:") or "floor" in method or not row.get("n"):
            continue
        gbps = row.get("gbps_med") or row.get("gbps_best")
        if gbps:
            op = _op_of(method)
            if "@" in method:  # bench_safetensors: "<row>@<storage>", one panel per storage
                method, storage = method.split("@", 1)
                op += f" [{storage}]"
            by_op.setdefault(op, {})[method.split(":")[0]] = float(gbps)
    panels = []
    for op, bars in sorted(by_op.items()):
        ref = summary.get(LIMITS.get(op.split(" [")[0], ""), {})
        limit = None
        if isinstance(ref, dict) and ref.get("gbps_med"):
            limit = (LIMIT_LABEL[LIMITS[op.split(" [")[0]]], float(ref["gbps_med"]))
        panels.append({"title": f"{name}: {op}", "bars": bars, "limit": limit})
    return panels


def panels_from_cloud(name: str, doc: dict[str, Any]) -> list[Panel]:
    """``{"results": {method: {op: {"median_mib_s": x, "best_mib_s": y}}}}`` (bench_cloud; older
    files have only ``best_mib_s``)."""
    by_op: dict[str, dict[str, float]] = {}
    which = "median"
    for method, ops in doc["results"].items():
        for op, row in (ops or {}).items():
            if not isinstance(row, dict):
                continue
            value = row.get("median_mib_s")
            if value is None and row.get("best_mib_s"):
                value, which = row["best_mib_s"], "best"
            if value:
                by_op.setdefault(op, {})[method] = value * 2**20 / 1e9
    return [
        {"title": f"{name}: {op} ({which})", "bars": bars, "limit": None}
        for op, bars in sorted(by_op.items())
    ]


def panels_from_async(name: str, doc: dict[str, Any]) -> list[Panel]:
    """``{"results": {variant: {"bytes": n, "blocked_s": [...]}}}``: bytes per second of blocked training."""
    bars = {}
    for variant, row in doc["results"].items():
        blocked = [s for s in (row or {}).get("blocked_s", []) if s > 0]
        if blocked and row.get("bytes"):
            bars[variant] = row["bytes"] / statistics.median(blocked) / 1e9
    return (
        [{"title": f"{name}: save, GB per second of training blocked", "bars": bars, "limit": None}]
        if bars
        else []
    )


def load_panels(results: Path) -> list[Panel]:
    panels: list[Panel] = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"chart: skipping {path.name}: {exc}", file=sys.stderr)
            continue
        name = path.stem
        if isinstance(doc.get("summary"), dict):
            panels += panels_from_summary(name, doc)
        elif isinstance(doc.get("results"), dict) and any(
            isinstance(v, dict) and "blocked_s" in v for v in doc["results"].values()
        ):
            panels += panels_from_async(name, doc)
        elif isinstance(doc.get("results"), dict):
            panels += panels_from_cloud(name, doc)
        else:
            print(f"chart: no known schema in {path.name}; skipped", file=sys.stderr)
    return [p for p in panels if p["bars"]]


def draw(panels: list[Panel], out: Path) -> None:
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, 1.1 + 0.42 * sum(len(p["bars"]) + 1 for p in panels)), squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels):
        bars: dict[str, float] = panel["bars"]
        names = sorted(bars, key=lambda k: bars[k])
        values = [bars[n] for n in names]
        colors = ["#d62728" if "ckptio" in n else "#7f7f7f" for n in names]
        ax.barh(names, values, color=colors)
        peers = [v for n, v in bars.items() if "ckptio" not in n]
        best_peer = max(peers) if peers else None
        for i, (n, v) in enumerate(zip(names, values)):
            label = f" {v:.2f}"
            if best_peer and "ckptio" in n:
                label += f"  ({v / best_peer:.2f}x best peer"
                if panel["limit"]:
                    label += f", {v / panel['limit'][1]:.0%} of {panel['limit'][0]}"
                label += ")"
            ax.text(v, i, label, va="center", fontsize=7)
        if panel["limit"]:
            ax.axvline(panel["limit"][1], color="black", linestyle="--", linewidth=1)
            ax.text(
                panel["limit"][1], len(names) - 0.5, f" limit: {panel['limit'][0]}", fontsize=7, va="bottom"
            )
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, max(values + ([panel["limit"][1]] if panel["limit"] else [])) * 1.6)
    axes[-1, 0].set_xlabel("GB/s (1 GB = 1e9 bytes; median unless noted; red: ckptio)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=None, help="default: <results>/throughput.png")
    args = p.parse_args(argv)
    panels = load_panels(args.results)
    if not panels:
        print(f"chart: no benchmark results under {args.results}", file=sys.stderr)
        return 1
    out = args.out or args.results / "throughput.png"
    draw(panels, out)
    print(f"chart: wrote {out} ({len(panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
