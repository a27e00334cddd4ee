"""ckptio-consolidated-hf: a ``from_pretrained``-ready HF directory inside each (or the final) step.

::

    mgr = ckptio.CheckpointManager("ckpts", addons=[("consolidated-hf", {"mode": "final", "tokenizer": tok})])
    mgr.save(step, {"model": ckptio.ModelState(model)}, final=True)
    AutoModelForCausalLM.from_pretrained("ckpts/step_00000100/consolidated")
"""

from .addon import ConsolidatedHFAddon, reference_layout, tied_aliases

__all__ = ["ConsolidatedHFAddon", "reference_layout", "tied_aliases"]
