"""ckptio-dora: DoRA magnitude keys in the HF PEFT on-disk form.

Use as an addon (``addons=["dora"]``) or call the rename functions directly (the ``peft`` addon
does, for ``adapter_model.safetensors``).
"""

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

__all__ = [
    "HF_SUFFIX",
    "NEMO_SUFFIX",
    "DoraAddon",
    "from_hf",
    "from_hf_key",
    "is_magnitude_key",
    "legacy_key",
    "module_of",
    "to_hf",
    "to_hf_key",
]
