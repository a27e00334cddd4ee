"""Progress bars for long operations, shown only where a person is watching.

A bar is drawn (with ``tqdm``, on stderr) only when all of these hold:

* nobody turned bars off: ``CKPTIO_PROGRESS=0`` (or ``false``/``off``/``no``) in the environment,
  or :func:`set_enabled(False) <set_enabled>` (what ``ckptio --no-progress`` does);
* stderr is a terminal (logs and CI output stay clean), unless ``CKPTIO_PROGRESS=1`` forces it;
* this process is rank 0 (under ``torchrun`` every rank would otherwise draw its own bar).

Usage::

    with ckptio.progress.progress(total_bytes, "save") as bar:
        for chunk in chunks:
            write(chunk)
            bar.update(len(chunk))

A disabled bar is a no-op object with the same methods, so callers never branch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ENV = "CKPTIO_PROGRESS"
_OFF = {"0", "false", "off", "no"}
_ON = {"1", "true", "on", "yes", "force"}

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force bars on (``True``) or off (``False``) in this process; ``None`` restores the default."""
    global _forced
    _forced = enabled


def _rank() -> int:
    """This process's rank: from torch.distributed if initialised, else torchrun's ``RANK``."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch without distributed support
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def enabled(stream: Any = None) -> bool:
    """Whether a bar would be drawn now (see the module docstring for the rules)."""
    if _rank() != 0:
        return False
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress bar, or a silent stand-in with the same methods when bars are off."""

    def __init__(
        self,
        total: int | float | None,
        desc: str,
        unit: str = "B",
        *,
        enable: bool | None = None,
        delay: float = 0.0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.count: int | float = 0
        self._bar: Any = None
        if enable if enable is not None else enabled():
            from tqdm import tqdm

            scale = unit == "B"
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=scale,
                unit_divisor=1024 if scale else 1000,
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
                delay=delay,
            )

    @property
    def active(self) -> bool:
        """Whether a bar is actually drawn."""
        return self._bar is not None

    def update(self, n: int | float = 1) -> None:
        """Advance by ``n`` units (bytes, files, tensors...)."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def progress(
    total: int | float | None,
    desc: str,
    unit: str = "B",
    *,
    enable: bool | None = None,
    delay: float = 0.0,
) -> Iterator[Progress]:
    """A :class:`Progress` for the duration of a ``with`` block (closed even on error).

    :param total: units expected (``None`` when unknown: the bar then counts without a percentage).
    :param unit: ``"B"`` scales to KiB/MiB/GiB; any other unit is shown as counted.
    :param enable: override the automatic decision (``None``: decide with :func:`enabled`).
    :param delay: show the bar only once the operation has lasted this many seconds.
    """
    bar = Progress(total, desc, unit, enable=enable, delay=delay)
    try:
        yield bar
    finally:
        bar.close()


__all__ = ["ENV", "Progress", "enabled", "progress", "set_enabled"]
