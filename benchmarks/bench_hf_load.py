"""Loading a Hugging Face directory into an fp32 model: ckptio vs ``from_pretrained`` vs NeMo-style.

The directory is what ``save_pretrained`` writes for a bf16 Llama (untied, large hidden size and
vocabulary so that few big tensors make up the bytes): ``model-0000i-of-0000N.safetensors`` shards
of at most 400 MB, ``model.safetensors.index.json`` and ``config.json``, ~1 GB by default
(``--gb``, default ``$CKPTIO_BENCH_HF_GB`` or 1.0, times ``$CKPTIO_BENCH_SCALE``). Each variant
builds an fp32 model and fills it from the directory, in a fresh process (``common.run_worker``):

* ``from_pretrained``  ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)``.
* ``ckptio``           the model built on the meta device (``from_config``), then
  ``ckptio.load({"model": ckptio.ModelState(model)}, dir)`` (materialised by the load, cast from
  bf16 band by band), then ``reset_non_persistent_buffers`` (rotary ``inv_freq``).
* ``nemo``             NeMo AutoModel's base-model init: the model on meta, ``to_empty(cpu)``, every
  shard read whole with ``safetensors.torch.load_file``, then ``set_model_state_dict``, then the
  same buffer reset.
* ``ckptio-existing``  (information) ``ckptio.load`` into a model that already exists (built and
  initialised before the timed region): the load alone.

Time is the wall time from "nothing built" to "model ready" (model construction included, except
for ``ckptio-existing``). Peak RSS is the worker's ``ru_maxrss``; "extra RSS" is the peak minus the
RSS before the timed region minus the model's own fp32 bytes (what the load costs beyond the model
it fills), also as a fraction of the checkpoint's bytes. Every variant's logits on a fixed input
are hashed and compared with ``from_pretrained``'s. Files are in the page cache (read once before
each round): this measures the load, not the disk. Rounds interleave the variants (``--rounds``,
default 5); medians are reported, with the CPU time (user + kernel) of the timed region, which
other jobs on a shared machine disturb much less than the wall time.

Run: ``.venv/bin/python benchmarks/bench_hf_load.py [--gb 1.0] [--rounds 5]``. Writes
``benchmarks/results/hf_load.md`` and ``hf_load.json`` when every variant ran (not with ``--only``,
which prints the table only, unless ``--write``). Targets (issue 13): ckptio at least as fast
as ``from_pretrained`` (>= 1.0x) with extra RSS at most 10% of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

VARIANTS = ("from_pretrained", "ckptio", "nemo", "ckptio-existing")
HOW = {
    "from_pretrained": "`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)`",
    "ckptio": "meta model + `ckptio.load({'model': ModelState(model)}, dir)`",
    "nemo": "meta model, `to_empty`, `load_file` of every shard, `set_model_state_dict`",
    "ckptio-existing": "`ckptio.load` into an existing fp32 model (load only; info)",
}
HIDDEN, FFN, VOCAB, HEADS = 2048, 5632, 32000, 16
SHARD_BYTES = 400 * 10**6
TARGET_SPEED, TARGET_EXTRA = 1.0, 0.10


def default_gb() -> float:
    raw = os.environ.get("CKPTIO_BENCH_HF_GB", "").strip()
    return (float(raw) if raw else 1.0) * common.default_scale()


def config_for(gb: float) -> Any:
    from transformers import LlamaConfig

    emb = 2 * VOCAB * HIDDEN * 2  # embed_tokens + lm_head, bf16
    layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) * 2
    layers = max(1, round((gb * 1e9 - emb) / layer))
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def make_hf_dir(path: Path, gb: float) -> int:
    """A ``save_pretrained``-shaped bf16 directory; returns its tensor bytes. Kept between runs
    (``config.json`` says which size it is)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = config_for(gb)
    marker = path / "config.json"
    if marker.exists() and json.loads(marker.read_text()).get("num_hidden_layers") == cfg.num_hidden_layers:
        return int(json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"])
    common.remove(path)
    path.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        if sizes[-1] and sizes[-1] + n > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shards[-1][name] = t.to(torch.bfloat16)
        sizes[-1] += n
    weight_map = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, fname))
        sd.clear()
    total = sum(sizes)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg.save_pretrained(path)
    return total


def _rss_kb() -> int:
    return common.proc_status_kb("VmRSS") or 0


def _worker(task: dict[str, Any]) -> None:
    import ckptio
    import torch
    import xxhash
    from ckptio_safetensors import reset_non_persistent_buffers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    variant, d = task["variant"], task["dir"]
    cfg = AutoConfig.from_pretrained(d)
    # modules every variant would import on its first load, imported before the measured region
    import ckptio_safetensors.format  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint.state_dict
    import transformers.core_model_loading
    import transformers.models.llama.modeling_llama  # noqa: F401

    model: Any = None
    if variant == "ckptio-existing":
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    rss0 = _rss_kb()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if variant == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    elif variant in ("ckptio", "ckptio-existing"):
        if model is None:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        ckptio.load({"model": ckptio.ModelState(model)}, d)
        reset_non_persistent_buffers(model)
    elif variant == "nemo":
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.to_empty(device="cpu")
        sd: dict[str, Any] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        set_model_state_dict(model, sd)
        del sd
        reset_non_persistent_buffers(model)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = r1.ru_maxrss
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    built_before = model_bytes if variant == "ckptio-existing" else 0  # already in rss0
    with torch.no_grad():
        out = model(input_ids=torch.arange(8).reshape(1, 8) * 1000 % cfg.vocab_size).logits
    common.emit_result(
        {
            "variant": variant,
            "seconds": seconds,
            "cpu_seconds": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "sys_seconds": r1.ru_stime - r0.ru_stime,
            "rss_before_mb": rss0 / 1024,
            "peak_rss_mb": peak_kb / 1024,
            "model_mb": model_bytes / 2**20,
            "extra_rss_mb": (peak_kb * 1024 - rss0 * 1024 - (model_bytes - built_before)) / 2**20,
            "dtype": str(next(model.parameters()).dtype),
            "logits_xxh3": xxhash.xxh3_64_hexdigest(out.contiguous().numpy().tobytes()),
        }
    )


def _table(gb_bytes: int, summary: dict[str, dict[str, Any]]) -> str:
    rows = []
    ref_hash = summary.get("from_pretrained", {}).get("logits_xxh3")
    for v in VARIANTS:
        s = summary.get(v)
        if s is None or not s.get("ok", True):
            rows.append([v, HOW[v], "failed: " + str((s or {}).get("error", "?")), "", "", "", "", "", ""])
            continue
        rows.append(
            [
                v,
                HOW[v],
                common.fmt(s["seconds_median"], 2),
                common.fmt(s["seconds_best"], 2),
                f"{common.fmt(s['cpu_median'], 2)} ({common.fmt(s['sys_median'], 2)})",
                common.fmt(gb_bytes / common.GB / s["seconds_median"], 2),
                common.fmt(s["peak_rss_mb"], 0),
                f"{common.fmt(s['extra_rss_mb'], 0)} ({100 * s['extra_rss_mb'] * 2**20 / gb_bytes:.1f}%)",
                "yes" if s["logits_xxh3"] == ref_hash else "NO",
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "how",
            "time, median (s)",
            "best (s)",
            "CPU, median (s) (of which kernel)",
            "GB/s (checkpoint)",
            "peak RSS (MB)",
            "extra RSS (MB, % of ckpt)",
            "logits = from_pretrained",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=default_gb())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work-dir", type=Path, default=common.DEFAULT_WORK_DIR)
    p.add_argument("--only", default=",".join(VARIANTS))
    p.add_argument("--keep", action="store_true", help="keep the HF directory under --work-dir")
    p.add_argument("--write", action="store_true", help="write results/hf_load.* even with --only")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    variants = [v for v in args.only.split(",") if v]
    facts = common.machine_facts(args.work_dir)
    import transformers

    facts["transformers"] = transformers.__version__
    d = args.work_dir / f"hf-llama-{args.gb:g}gb"
    nbytes = make_hf_dir(d, args.gb)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            common.read_all(d)  # page cache warm for everyone
            res = common.run_worker(Path(__file__).resolve(), {"variant": v, "dir": str(d)}, timeout=1800)
            samples[v].append(res)
            print(f"round {r + 1} {v}: {res.get('seconds', res.get('error'))}", flush=True)
    facts["loadavg_end"] = common.loadavg()
    summary: dict[str, dict[str, Any]] = {}
    for v, runs in samples.items():
        ok = [s for s in runs if s.get("ok", True) and "seconds" in s]
        if not ok:
            summary[v] = {"ok": False, "error": runs[-1].get("error") if runs else "not run"}
            continue
        summary[v] = {
            "seconds_median": statistics.median(s["seconds"] for s in ok),
            "seconds_best": min(s["seconds"] for s in ok),
            "cpu_median": statistics.median(s["cpu_seconds"] for s in ok),
            "sys_median": statistics.median(s["sys_seconds"] for s in ok),
            "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in ok),
            "extra_rss_mb": statistics.median(s["extra_rss_mb"] for s in ok),
            "model_mb": ok[0]["model_mb"],
            "logits_xxh3": ok[0]["logits_xxh3"],
            "logits_consistent": len({s["logits_xxh3"] for s in ok}) == 1,
        }
    fp, ck = summary.get("from_pretrained", {}), summary.get("ckptio", {})
    verdict = ""
    if fp.get("seconds_median") and ck.get("seconds_median"):
        speed = fp["seconds_median"] / ck["seconds_median"]
        cpu_ratio = fp["cpu_median"] / ck["cpu_median"]
        extra = ck["extra_rss_mb"] * 2**20 / nbytes
        ok_speed, ok_extra = speed >= TARGET_SPEED, extra <= TARGET_EXTRA
        verdict = (
            f"**Issue 13 targets: ckptio vs from_pretrained {speed:.2f}x "
            f"({'PASS' if ok_speed else 'FAIL'}, >= {TARGET_SPEED}x); ckptio extra RSS {100 * extra:.1f}% of the "
            f"checkpoint ({'PASS' if ok_extra else 'FAIL'}, <= {100 * TARGET_EXTRA:.0f}%)**; "
            f"CPU time (user + kernel) from_pretrained / ckptio {cpu_ratio:.2f}x"
        )
        summary["targets"] = {
            "speed": speed,
            "cpu_ratio": cpu_ratio,
            "extra_fraction": extra,
            "pass": ok_speed and ok_extra,
        }
    cfg = config_for(args.gb)
    md = "\n\n".join(
        [
            "# Loading a Hugging Face directory into an fp32 model",
            f"A bf16 Llama directory as `save_pretrained` writes it: {nbytes / common.GB:.2f} GB of tensors "
            f"({cfg.num_hidden_layers} layers, hidden {HIDDEN}, intermediate {FFN}, vocabulary {VOCAB}, untied), "
            f"{len(list(d.glob('*.safetensors')))} shards of at most {SHARD_BYTES // 10**6} MB, loaded into an fp32 "
            f"model ({2 * nbytes / common.GB:.2f} GB). Each variant in a fresh process, {args.rounds} round(s) "
            "interleaved, medians; files in the page cache. "
            f"transformers {facts['transformers']}, torch {facts.get('torch')}, {facts.get('cpus_usable')} usable "
            f"CPUs, shared with other jobs: load average {facts.get('loadavg_start')} at start, "
            f"{facts.get('loadavg_end')} at the end.",
            _table(nbytes, summary),
            verdict,
            "Time runs from nothing built to the model ready (construction included; `ckptio-existing` times "
            "the load into a model built beforehand). Extra RSS = peak RSS (`ru_maxrss`) - RSS before the timed "
            "region - the fp32 model's bytes: what filling the model costs beyond the model itself. "
            "`from_pretrained` reads through mmap, so the shards' pages count in its RSS; ckptio reads with "
            "`preadv` into a reused 1 MiB buffer per reader thread and casts each band into the model's memory "
            "(tensors over 64 MiB in 32 MiB bands of rows, one reader thread each), while background threads map the fresh model pages (`MADV_POPULATE_WRITE`); a directory "
            "whose names and shapes already are the model's skips building transformers' conversion mapping. "
            "NeMo-style holds the whole bf16 state dict before copying it in.",
        ]
    )
    data = {"facts": facts, "gb": args.gb, "bytes": nbytes, "summary": summary, "samples": samples}
    if not args.keep:
        common.remove(d)
    print(md)
    if set(variants) == set(VARIANTS) or args.write:
        md_path, js_path = common.write_results("hf_load", md + "\n", data)
        print(f"wrote {md_path} and {js_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
