"""Plugin packages export their names lazily (ckptio._lazy): every name must resolve, to the
object itself and never to a same-named submodule."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = [
    "ckptio_fsspec",
    "ckptio_msc",
    "ckptio_safetensors",
    "ckptio_peft",
    "ckptio_consolidated_hf",
    "ckptio_dora",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_resolves_to_an_object(package: str) -> None:
    mod = importlib.import_module(package)
    for name in mod.__all__:
        value = getattr(mod, name)
        assert not isinstance(value, types.ModuleType), f"{package}.{name} is a module"
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018
