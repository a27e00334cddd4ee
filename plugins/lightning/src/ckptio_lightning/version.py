"""The Lightning releases this integration is tested with, checked when it is constructed.

The integration leans on a few behaviours of Lightning that are not public API (how
``ModelCheckpoint`` lists ``last`` checkpoints, how ``AsyncCheckpointIO`` queues saves), so a
release outside the tested range is refused with the range named, rather than half-working.
Keep :data:`SUPPORTED` equal to the ``lightning`` requirement in ``pyproject.toml``.

Tested: 2.5.4, 2.5.6 and 2.6.6. The floor is 2.5.4 because older ``AsyncCheckpointIO`` queues the
live tensors, not a copy: the background save can then mix weights of two steps (the resume
test catches it on 2.5.0).
"""

from __future__ import annotations

from importlib import metadata

from ckptio.errors import PluginError

#: The tested range, as pip spells it (the ``lightning`` dependency of ``ckptio-lightning``).
SUPPORTED = ">=2.5.4,<2.7"
SUPPORTED_LIGHTNING = SUPPORTED  # the name ckptio_lightning exports


def installed_version() -> str | None:
    """The installed ``lightning`` distribution's version, ``None`` when it is not installed."""
    try:
        return metadata.version("lightning")
    except metadata.PackageNotFoundError:
        return None


def check_version(version: str | None = None) -> str:
    """Return the installed (or given) Lightning version; raise :class:`~ckptio.PluginError`
    naming the supported range when it is outside it."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = installed_version() if version is None else version
    hint = f"pip install 'lightning{SUPPORTED}'"
    if found is None:
        raise PluginError(f"ckptio-lightning needs the lightning package ({SUPPORTED}): {hint}")
    try:
        ok = Version(found) in SpecifierSet(SUPPORTED, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise PluginError(
            f"ckptio-lightning supports lightning{SUPPORTED}, but lightning {found} is installed: "
            f"{hint} (or a ckptio-lightning release that supports {found})"
        )
    return found
