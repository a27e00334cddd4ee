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
    (ckpt / "manifest.json").write_text(json.dumps(body, sort_keys=True, indent=1))


def data_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.endswith(".bin"))


def load_and_verify(ckpt: Path, strict: bool = True) -> None:
    """Both ways of reading a checkpoint: a verifying load and ``ckptio.verify``."""
    ckptio.load(empty_like_state(), str(ckpt), strict=strict)
    ckptio.verify(str(ckpt))
