"""Declared options: every keyword ckptio accepts is named somewhere, and a misspelt one fails at once.

``save``, ``load`` and :class:`~ckptio.CheckpointManager` declare theirs in their signatures; a
format declares the options of its writer and reader as two keyword-only dataclasses
(:attr:`Format.save_options <ckptio.Format.save_options>` and ``load_options``), one documented
field per option; a backend checks its ``storage_options`` in its factory. Each of them refuses an
unknown name with :func:`check_options`, before anything is written, so that
``CheckpointManager(url, retenton=KeepLatest(1))`` is an :class:`~ckptio.OptionError` naming
``retention`` instead of a run that silently keeps every step.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import OptionError


def check_options(
    given: Iterable[str], valid: Iterable[str], where: str, *, deprecated: Iterable[str] = ()
) -> None:
    """Raise :class:`~ckptio.OptionError` when a name in ``given`` is not in ``valid``.

    The message names the closest valid option (``difflib``) and lists them all::

        unknown option 'retenton' for CheckpointManager; did you mean 'retention'? Valid: ...

    :param given: the option names received (a dict of options is fine).
    :param valid: the names declared.
    :param where: what takes the options, as the message should name it (``"CheckpointManager"``,
        ``"the safetensors format (save)"``, ``"the file:// backend"``...).
    :param deprecated: names still accepted but neither suggested nor listed.
    """
    names = sorted(set(valid))
    allowed = set(names) | set(deprecated)
    unknown = [str(name) for name in given if name not in allowed]
    if not unknown:
        return
    close = {n: difflib.get_close_matches(n, names, n=1) for n in unknown}
    if len(unknown) == 1:
        (name,) = unknown
        head = f"unknown option {name!r} for {where}" + (
            f"; did you mean {close[name][0]!r}?" if close[name] else "."
        )
    else:
        listed_unknown = ", ".join(
            f"{n!r} (did you mean {close[n][0]!r}?)" if close[n] else repr(n) for n in unknown
        )
        head = f"unknown options {listed_unknown} for {where}."
    valid_text = ", ".join(names) if names else "none (it takes no options)"
    raise OptionError(f"{head} Valid: {valid_text}")


def declared_keywords(fn: Any) -> list[str]:
    """The keyword-only parameters of ``fn`` (a function or a class): the options it declares
    itself, beside those its ``**kwargs`` take on to a format."""
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def option_names(options_class: Any, *, deprecated: bool = False) -> list[str]:
    """The option names a kw-only options dataclass declares (its init fields): the current ones,
    or with ``deprecated=True`` those marked ``field(metadata={"deprecated": True})``."""
    return [
        f.name
        for f in dataclasses.fields(options_class)
        if f.init and bool(f.metadata.get("deprecated")) == deprecated
    ]


def build_options(options_class: Any, given: Mapping[str, Any] | Any | None, where: str) -> Any:
    """An instance of ``options_class`` from ``given`` (a mapping of keywords, an instance already,
    or ``None`` for the defaults), refusing undeclared names with :func:`check_options`."""
    if given is None:
        return options_class()
    if isinstance(given, options_class):
        return given
    given = dict(given)
    check_options(
        given, option_names(options_class), where, deprecated=option_names(options_class, deprecated=True)
    )
    return options_class(**given)


def renamed(options: dict[str, Any], old: str, new: str, where: str, stacklevel: int = 3) -> Any:
    """Pop the deprecated keyword ``old`` from ``options`` (warning), for a parameter now named
    ``new``; returns its value, or ``None`` when it was not given."""
    if old not in options:
        return None
    warnings.warn(
        f"{where}: {old}= is deprecated, use {new}= (same meaning)", DeprecationWarning, stacklevel=stacklevel
    )
    return options.pop(old)
