"""DoRA magnitude key names: in memory (HF PEFT, NeMo AutoModel) versus on disk (HF PEFT files).

DoRA adds one learned magnitude vector per adapted module. Three spellings of the same tensor
circulate, and a checkpoint must be loadable whichever one wrote it:

* in-memory HF PEFT: ``<module>.lora_magnitude_vector.<adapter>.weight`` (a ``ParameterDict``-like
  ``ModuleDict`` of ``nn.Parameter`` holders, hence the adapter name and ``.weight``);
* in-memory NeMo AutoModel: ``<module>.lora_magnitude``;
* on disk, as HF PEFT's ``save_pretrained`` writes it: ``<module>.lora_magnitude_vector`` (no
  adapter name, no ``.weight``). Older PEFT releases wrote
  ``<module>.lora_magnitude_vector.default.weight``; that legacy form must still load.

The in-memory PEFT form with the adapter ``default`` and the legacy on-disk form are the same
string, so :func:`from_hf_key` reads any ``.lora_magnitude_vector.<adapter>.weight`` as legacy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, TypeVar

V = TypeVar("V")

HF_SUFFIX = ".lora_magnitude_vector"
NEMO_SUFFIX = ".lora_magnitude"
LEGACY_ADAPTER = "default"
Style = Literal["peft", "nemo"]

_PEFT_FORM = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector\.(?P<adapter>[^.]+)\.weight$")


def module_of(key: str) -> str | None:
    """The adapted module's name if ``key`` is a DoRA magnitude in any spelling, else ``None``."""
    m = _PEFT_FORM.match(key)
    if m:
        return m.group("module")
    for suffix in (HF_SUFFIX, NEMO_SUFFIX):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return None


def is_magnitude_key(key: str) -> bool:
    return module_of(key) is not None


def to_hf_key(key: str) -> str:
    """The on-disk HF PEFT name of ``key`` (unchanged when it is not a DoRA magnitude)."""
    module = module_of(key)
    return key if module is None else module + HF_SUFFIX


def legacy_key(key: str, adapter: str = LEGACY_ADAPTER) -> str:
    """The legacy on-disk name ``<module>.lora_magnitude_vector.<adapter>.weight`` of ``key``."""
    module = module_of(key)
    return key if module is None else f"{module}{HF_SUFFIX}.{adapter}.weight"


def from_hf_key(key: str, style: Style = "peft", adapter: str = LEGACY_ADAPTER) -> str:
    """The in-memory name of an on-disk key (current or legacy form) for ``style``.

    ``style="peft"`` gives ``<module>.lora_magnitude_vector.<adapter>.weight``, ``"nemo"`` gives
    ``<module>.lora_magnitude``. Keys that are not DoRA magnitudes are returned unchanged.
    """
    module = module_of(key)
    if module is None:
        return key
    if style == "nemo":
        return module + NEMO_SUFFIX
    if style == "peft":
        return f"{module}{HF_SUFFIX}.{adapter}.weight"
    raise ValueError(f"style={style!r}: expected 'peft' or 'nemo'")


def to_hf(state_dict: Mapping[str, V]) -> dict[str, V]:
    """A copy of ``state_dict`` with every DoRA magnitude renamed to the on-disk form."""
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        new = to_hf_key(key)
        if new in out:
            raise ValueError(f"two keys map to the DoRA on-disk name {new!r}; the state dict mixes spellings")
        out[new] = value
    return out


def from_hf(
    state_dict: Mapping[str, V], style: Style = "peft", adapter: str = LEGACY_ADAPTER
) -> dict[str, V]:
    """A copy of an on-disk state dict with DoRA magnitudes renamed to the in-memory ``style``."""
    return {from_hf_key(k, style, adapter): v for k, v in state_dict.items()}
