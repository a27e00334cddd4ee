"""``ckptio cp`` converting formats streams: its peak memory does not grow with the checkpoint.

``ckptio cp`` (``ckptio.cli.main``, as the console script runs it) converts a ~200 MB checkpoint
native -> safetensors -> native in fresh interpreters that report their peak RSS (``VmHWM``). A
conversion of a ~9 MB checkpoint with the same layout gives the baseline (interpreter, torch,
ckptio, the format plugins, thread stacks); the large one may add at most :data:`BOUND` on top of
it. Holding the checkpoint, as ``cp`` did before it streamed, would add its 200 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ckptio
import pytest
import torch

MIB = 1 << 20
TENSOR_MIB = 8
#: Extra peak memory allowed for the large conversion: the documented bound of a few tensors in
#: flight (2 writer threads x 2 + 1 read, 8 MiB each) plus the 32 MiB small-tensor cache, with room.
BOUND = 96 * MIB


def _checkpoint(path: Path, n_large: int) -> int:
    """``n_large`` tensors of 8 MiB plus 200 small ones and values, as a model would have."""
    numel = TENSOR_MIB * MIB // 4
    state = {
        "model": {f"layers.{i}.weight": torch.full((numel,), float(i)) for i in range(n_large)},
        "norms": {f"{i}.bias": torch.full((64,), float(i)) for i in range(200)},
        "step": 12,
        "config": {"name": "mem", "dims": [numel]},
    }
    ckptio.save(state, str(path))
    return ckptio.manifest(str(path)).total_bytes


#: Runs ``ckptio ARGS`` as the console script does, then prints the process's peak RSS. VmHWM
#: belongs to the address space made at ``exec``; ``ru_maxrss`` would also count the pages of
#: the (large) test process the child was forked from.
_WRAPPER = """
import sys
from ckptio.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
print("VmHWM_KiB", hwm)
sys.exit(code)
"""


def _peak_rss(args: list[str]) -> int:
    """Run ``ckptio ARGS`` in a fresh interpreter and return its peak RSS in bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args, "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "CKPTIO_PROGRESS": "0"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("VmHWM_KiB"))
    return int(line.split()[1]) * 1024


def test_cp_conversion_peak_memory_is_bounded(tmp_path: Path) -> None:
    pytest.importorskip("ckptio_safetensors")
    small, large = tmp_path / "small", tmp_path / "large"
    _checkpoint(small, 1)
    size = _checkpoint(large, 25)
    assert size > 200 * MIB
    peaks: dict[str, dict[str, int]] = {}
    for name in ("small", "large"):
        src = tmp_path / name
        st = tmp_path / f"{name}-st"
        back = tmp_path / f"{name}-back"
        peaks[name] = {
            "to safetensors": _peak_rss(["cp", str(src), f"safetensors+file://{st}"]),
            "to native": _peak_rss(["cp", str(st), str(back), "--format", "native"]),
        }
    for way in ("to safetensors", "to native"):
        extra = peaks["large"][way] - peaks["small"][way]
        print(
            f"{way}: baseline {peaks['small'][way] / MIB:.0f} MiB, large {peaks['large'][way] / MIB:.0f} MiB"
        )
        assert extra < BOUND, (
            f"converting {size / MIB:.0f} MiB {way} took {extra / MIB:.0f} MiB more than the baseline "
            f"({peaks['small'][way] / MIB:.0f} MiB); the bound is {BOUND / MIB:.0f} MiB"
        )
    out = ckptio.load_state(str(tmp_path / "large-back"), keys=["model.layers.24", "step"])
    assert torch.equal(out["model"]["layers.24.weight"], torch.full((TENSOR_MIB * MIB // 4,), 24.0))
    assert out["step"] == 12
