"""Which transformers versions the integration supports, checked when a trainer is built.

The integration overrides private ``Trainer`` methods (there is no public hook that replaces the
Trainer's own checkpoint writing), so a transformers release outside the tested range is refused
with an error naming the range, rather than failing in the middle of a run. The signatures of
the overridden methods are checked too: a renamed parameter shows up at construction.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from ckptio.errors import PluginError

#: The transformers versions this release of ckptio-transformers accepts (tested: 5.24).
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
TESTED_TRANSFORMERS = "5.24"

#: Set to 1 to skip the version check (at your own risk: private methods may have changed).
SKIP_ENV = "CKPTIO_TRANSFORMERS_SKIP_VERSION_CHECK"

#: The private ``Trainer`` methods overridden, with the parameters the overrides expect.
OVERRIDDEN: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_load_rng_state": ("self", "checkpoint"),
    "_load_best_model": ("self",),
}


class TransformersVersionError(PluginError):
    """The installed transformers is outside the range ckptio-transformers supports."""


def check_transformers_version(version: str | None = None, trainer_cls: Any = None) -> None:
    """Raise :class:`TransformersVersionError` unless ``version`` (default: the installed one) is
    in :data:`SUPPORTED_TRANSFORMERS` and the private methods have the expected signatures."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = str(transformers.__version__)
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise TransformersVersionError(
            f"ckptio-transformers supports transformers{SUPPORTED_TRANSFORMERS} (tested with "
            f"{TESTED_TRANSFORMERS}); transformers {version} is installed. Install a supported "
            f"version (pip install 'transformers{SUPPORTED_TRANSFORMERS}') or upgrade ckptio-transformers; "
            f"{SKIP_ENV}=1 skips this check at your own risk"
        )
    if trainer_cls is None:
        from transformers import Trainer

        trainer_cls = Trainer
    for name, expected in OVERRIDDEN.items():
        method = getattr(trainer_cls, name, None)
        params = tuple(inspect.signature(method).parameters) if callable(method) else None
        if params != expected:
            raise TransformersVersionError(
                f"transformers {version}: Trainer.{name} is {'missing' if params is None else params}, "
                f"ckptio-transformers expects {expected}; this transformers release is not supported "
                f"(supported: transformers{SUPPORTED_TRANSFORMERS}, tested with {TESTED_TRANSFORMERS})"
            )
