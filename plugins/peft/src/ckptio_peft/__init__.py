"""ckptio-peft: save PEFT adapters (LoRA, DoRA) through ckptio in HF PEFT's format, and load them back.

Save::

    mgr = ckptio.CheckpointManager("ckpts", addons=[("peft", {"tokenizer": tok})])
    mgr.save(step, {"model": ckptio.ModelState(peft_model), "optim": ckptio.OptimizerState(peft_model, opt)})
    # ckpts/step_00000100/ now loads with peft.PeftModel.from_pretrained(base_model, that_dir)

Load an adapter written by ckptio or by ``save_pretrained``, from any backend, with the generic
API (a PEFT directory has no optimizer state: load it into a state holding the model)::

    ckptio.load({"model": ckptio.ModelState(peft_model)}, "s3://bucket/hf-adapter", addons=["peft"])
    ckptio_peft.load_adapter(peft_model, "s3://bucket/run/step_00000100")   # the adapter file alone

LoRA and DoRA (current and legacy magnitude names), ``modules_to_save`` heads, and models wrapped
by ``checkpoint_wrapper``, ``torch.compile`` or FSDP are handled; see ``docs/peft.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from .adapter import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        AdapterLayout,
        AdapterLoadResult,
        adapter_layout,
        adapter_names,
        load_adapter,
        peft_config_json,
        read_adapter,
    )
    from .addon import PeftAddon

_EXPORTS = {
    "ADAPTER_CONFIG": ".adapter",
    "adapter_layout": ".adapter",
    "AdapterLayout": ".adapter",
    "adapter_names": ".adapter",
    "ADAPTER_WEIGHTS": ".adapter",
    "AdapterLoadResult": ".adapter",
    "load_adapter": ".adapter",
    "peft_config_json": ".adapter",
    "PeftAddon": ".addon",
    "read_adapter": ".adapter",
}
__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterLayout",
    "AdapterLoadResult",
    "PeftAddon",
    "adapter_layout",
    "adapter_names",
    "load_adapter",
    "peft_config_json",
    "read_adapter",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
