"""ckptio-dora: DoRA magnitude keys in the HF PEFT on-disk form.

Use as an addon (``addons=["dora"]``) or call the rename functions directly (the ``peft`` addon
does, for ``adapter_model.safetensors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from .addon import DoraAddon
    from .names import (
        HF_SUFFIX,
        NEMO_SUFFIX,
        from_hf,
        from_hf_key,
        is_magnitude_key,
        legacy_key,
        module_of,
        to_hf,
        to_hf_key,
    )

_EXPORTS = {
    "DoraAddon": ".addon",
    "from_hf": ".names",
    "from_hf_key": ".names",
    "HF_SUFFIX": ".names",
    "is_magnitude_key": ".names",
    "legacy_key": ".names",
    "module_of": ".names",
    "NEMO_SUFFIX": ".names",
    "to_hf": ".names",
    "to_hf_key": ".names",
}
__all__ = [
    "DoraAddon",
    "HF_SUFFIX",
    "NEMO_SUFFIX",
    "from_hf",
    "from_hf_key",
    "is_magnitude_key",
    "legacy_key",
    "module_of",
    "to_hf",
    "to_hf_key",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
