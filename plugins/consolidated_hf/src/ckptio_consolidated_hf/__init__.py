"""ckptio-consolidated-hf: a ``from_pretrained``-ready HF directory inside each (or the final) step.

::

    mgr = ckptio.CheckpointManager("ckpts", addons=[("consolidated-hf", {"mode": "final", "tokenizer": tok})])
    mgr.save(step, {"model": ckptio.ModelState(model)}, final=True)
    AutoModelForCausalLM.from_pretrained("ckpts/step_00000100/consolidated")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from .addon import ConsolidatedHFAddon, reference_layout, tied_aliases

_EXPORTS = {
    "ConsolidatedHFAddon": ".addon",
    "reference_layout": ".addon",
    "tied_aliases": ".addon",
}
__all__ = ["ConsolidatedHFAddon", "reference_layout", "tied_aliases"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
