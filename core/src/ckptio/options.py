"""Declared options: every keyword ckptio accepts is named somewhere, and a misspelt one fails at once.

``save``, ``load`` and :class:`~ckptio.CheckpointManager` declare theirs in their signatures; a
format declares the options of its writer and reader as two keyword-only dataclasses
(:attr:`Format.save_options <ckptio.Format.save_options>` and ``load_options``), one documented
field per option; a backend checks its ``storage_options`` in its factory. Each of them refuses an
unknown name with :func:`check_options`, before anything is written, so that
``CheckpointManager(url, retenton=KeepLatest(1))`` is an :class:`~ckptio.OptionError` naming
``retention`` instead of a run that silently keeps every step. An object-store backend, whose
``storage_options`` also carry its driver's keywords, checks in pass-through mode: only a near-miss
of one of ckptio's names is refused (:meth:`ckptio.objectstore.TransferOptions.pop_from`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import OptionError

#: how close (``difflib`` ratio) a name must be to a declared one to be suggested for it
SUGGEST_CUTOFF = 0.6
#: in pass-through mode, how close an undeclared name must be to a declared one to be refused as
#: its typo rather than passed on (stricter: the names passed on are someone else's, not typos)
NEAR_MISS_CUTOFF = 0.8


def check_options(
    given: Iterable[str],
    valid: Iterable[str],
    where: str,
    *,
    deprecated: Iterable[str] = (),
    pass_through: bool = False,
    accepted: Iterable[str] | Callable[[], Iterable[str]] = (),
) -> None:
    """Raise :class:`~ckptio.OptionError` when a name in ``given`` is not in ``valid``.

    The message names the closest valid option (``difflib``) and lists them all::

        unknown option 'retenton' for CheckpointManager; did you mean 'retention'? Valid: ...

    With ``pass_through=True`` the undeclared names belong to someone else (a storage driver's
    keywords beside a backend's own ``storage_options``) and pass, except one that is a near-miss
    of a declared name (:data:`NEAR_MISS_CUTOFF`), which is refused as its typo; the message then
    lists no valid names (the other side's are not known)::

        unknown option 'part_sise' for the s3:// backend (storage_options); did you mean 'part_size'?

    :param given: the option names received (a dict of options is fine).
    :param valid: the names declared.
    :param where: what takes the options, as the message should name it (``"CheckpointManager"``,
        ``"the safetensors format (save)"``, ``"the file:// backend"``...).
    :param deprecated: names still accepted but neither suggested nor listed.
    :param pass_through: let undeclared names pass unless they are a near-miss of a declared one.
    :param accepted: further names accepted although close to a declared one (the driver's
        keywords), or a function listing them, called only when a near-miss needs it.
    """
    names = sorted(set(valid))
    allowed = set(names) | set(deprecated)
    cutoff = NEAR_MISS_CUTOFF if pass_through else SUGGEST_CUTOFF
    close: dict[str, list[str]] = {}
    for name in map(str, given):
        if name not in allowed:
            close[name] = difflib.get_close_matches(name.lower(), names, n=1, cutoff=cutoff)
    if pass_through:
        close = {n: c for n, c in close.items() if c}
    if close and accepted:
        others = set(accepted() if callable(accepted) else accepted)
        close = {n: c for n, c in close.items() if n not in others}
    if not close:
        return
    unknown = list(close)
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
    if pass_through:
        raise OptionError(head)
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
