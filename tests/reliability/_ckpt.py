"""Helpers shared by the reliability tests: a small reference checkpoint and manifest surgery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ckptio
import torch
import xxhash


def sample_state() -> dict[str, Any]:
    """A small state with the kinds of values real checkpoints hold."""
    return {
        "model": {
            "w": torch.arange(48, dtype=torch.float32).reshape(6, 8),
            "b": torch.linspace(0, 1, 10).to(torch.bfloat16),
            "ids": torch.arange(7, dtype=torch.int64),
        },
        "step": 3,
        "cfg": {"lr": 0.1, "name": "run", "betas": (0.9, 0.99)},
    }


def empty_like_state() -> dict[str, Any]:
    """A destination for :func:`sample_state`: same keys, shapes and dtypes, different values."""
    s = sample_state()
    for t in s["model"].values():
        t.zero_()
    s["step"] = 0
    s["cfg"] = {"lr": 0.0, "name": "", "betas": (0.0, 0.0)}
    return s


def make_checkpoint(path: Path, thread_count: int = 2) -> Path:
    ckptio.save(sample_state(), str(path), thread_count=thread_count)
    return path


def clone(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def read_manifest_json(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text())


def write_signed_manifest(ckpt: Path, body: dict[str, Any]) -> None:
    """Write ``body`` as the manifest with a *valid* self-checksum, as an attacker could.

    The checksum catches accidents; signing the mutated manifest again makes sure the checks
    behind it (sizes, offsets, names) are what stops a hostile one.
    """
    body = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    body["checksum"] = "xxh3_64:" + xxhash.xxh3_64_hexdigest(text.encode())
    (ckpt / "manifest.json").write_text(json.dumps(body, sort_keys=True, separators=(",", ":")))


def data_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.endswith(".bin"))


def load_and_verify(ckpt: Path, strict: bool = True) -> None:
    """Both ways of reading a checkpoint: a verifying load and ``ckptio.verify``."""
    ckptio.load(empty_like_state(), str(ckpt), strict=strict)
    ckptio.verify(str(ckpt))


Box = tuple[tuple[int, ...], tuple[int, ...]]


def write_chunked(
    ckpt: Path, fqn: str, tensor: torch.Tensor, chunks: list[Box], file: str = "chunks.bin"
) -> None:
    """Describe native tensor ``fqn`` as ``chunks`` (``(offsets, sizes)``) with valid checksums.

    The chunks' bytes (cut from ``tensor``, clipped to it) go back to back into a new data file;
    the manifest is re-signed. Valid chunk lists give a valid checkpoint; hostile ones (overlaps,
    gaps) give a checkpoint whose every checksum and size is right, so only the chunk checks
    can stop it.
    """
    body = read_manifest_json(ckpt)
    fm = body["format_metadata"]
    fm["dcp"]["state"][fqn]["chunks"] = [[list(o), list(s)] for o, s in chunks]
    storage = [e for e in fm["storage"] if e["fqn"] != fqn]
    raw_all = tensor.contiguous().view(torch.uint8).reshape(*tensor.shape, -1)
    parts = []
    pos = 0
    for o, s in chunks:
        piece = raw_all[tuple(slice(a, a + b) for a, b in zip(o, s))]
        raw = piece.contiguous().numpy().tobytes()
        storage.append(
            {
                "fqn": fqn,
                "offsets": list(o),
                "file": file,
                "pos": pos,
                "length": len(raw),
                "xxh3": [xxhash.xxh3_64_hexdigest(raw)],
            }
        )
        parts.append(raw)
        pos += len(raw)
    fm["storage"] = storage
    (ckpt / file).write_bytes(b"".join(parts))
    body["files"][file] = {"size": pos}
    write_signed_manifest(ckpt, body)


def write_signed_text(ckpt: Path, body: dict[str, Any], raw: dict[str, str]) -> None:
    """:func:`write_signed_manifest`, with some string values replaced by raw JSON text.

    ``raw`` maps placeholder strings (set as values in ``body``) to JSON text that could not be
    built as Python objects and encoded by ``json`` (nesting thousands of levels deep, numbers
    with thousands of digits). The checksum is computed over the spliced text, as ckptio does.
    """
    body = {k: v for k, v in body.items() if k != "checksum"}

    def splice(text: str) -> str:
        for placeholder, value in raw.items():
            text = text.replace(json.dumps(placeholder), value)
        return text

    text = splice(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False))
    body["checksum"] = "xxh3_64:" + xxhash.xxh3_64_hexdigest(text.encode())
    (ckpt / "manifest.json").write_text(splice(json.dumps(body, sort_keys=True, separators=(",", ":"))))


def peak_rss_mb() -> float:
    """This process' peak RSS in MB (since the last :func:`reset_peak_rss_mb` where Linux allows)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss_mb() -> float:
    """Reset the peak RSS to the current RSS (``/proc/self/clear_refs``) and return it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss_mb()
