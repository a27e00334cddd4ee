"""The random generators a Trainer checkpoint holds: Python, NumPy, torch CPU and CUDA.

The Trainer restores them at a precise moment (after fast-forwarding the data loader past the
batches already trained on), not when the checkpoint is read, so loading keeps the values and
:meth:`TrainerRNG.apply` sets them later.
"""

from __future__ import annotations

from typing import Any

import ckptio
import numpy as np
import torch


class TrainerRNG:
    """``Stateful``: this process's generators; store it wrapped in ``ckptio.PerRank``.

    ``state_dict()`` reads the generators now; ``load_state_dict()`` only keeps the values, and
    :meth:`apply` sets them.
    """

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        sd = ckptio.RNGState().state_dict()  # torch, python (and cuda when present)
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        sd["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = dict(state_dict)

    def apply(self) -> bool:
        """Set the generators to the loaded values; ``False`` when nothing was loaded."""
        sd = self.loaded
        if not sd or "torch" not in sd or "python" not in sd:
            return False
        ckptio.RNGState().load_state_dict(sd)
        npst = sd.get("numpy")
        if isinstance(npst, dict):
            keys = np.asarray(npst["keys"].numpy(), dtype=np.int64).astype(np.uint32)
            np.random.set_state(
                (
                    str(npst["kind"]),
                    keys,
                    int(npst["pos"]),
                    int(npst["has_gauss"]),
                    float(npst["cached_gaussian"]),
                )
            )
        return True
