"""The extension API (``ckptio.ext``) and the import contract that keeps plugins on it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import ckptio.ext

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core" / "src" / "ckptio"
# public modules a plugin may import; everything else in core must be listed as forbidden
ALLOWED = {"ckptio.ext", "ckptio.errors", "ckptio.objectstore", "ckptio.testing"}


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    return contract


def test_every_core_module_is_public_or_forbidden_to_plugins() -> None:
    forbidden = set(_contract()["forbidden_modules"])
    modules = {
        f"ckptio.{p.stem if p.is_file() else p.name}"
        for p in CORE.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())
    }
    unclassified = modules - forbidden - ALLOWED
    assert not unclassified, (
        f"core modules {sorted(unclassified)} are neither in ckptio.ext's allowed set nor in the "
        "import-linter contract's forbidden_modules (root pyproject.toml): classify them"
    )
    assert not (forbidden & ALLOWED)


def test_every_distribution_is_a_source_of_the_contract() -> None:
    sources = set(_contract()["source_modules"])
    dists = {
        p.parent.name
        for pattern in ("backends/*/src/*/__init__.py", "plugins/*/src/*/__init__.py")
        for p in ROOT.glob(pattern)
    }
    assert dists <= sources, f"add {sorted(dists - sources)} to the import-linter contract"


def test_ext_exports_resolve() -> None:
    missing = [name for name in ckptio.ext.__all__ if not hasattr(ckptio.ext, name)]
    assert not missing
