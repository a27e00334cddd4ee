"""``ckptio.save`` and ``ckptio.load``: one checkpoint at one URL."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .addons import AddonLike, AddonSet
from .backend import read_limited
from .checkpoint import (
    LoadResult,
    SaveResult,
    check_call_options,
    load_checkpoint,
    open_backend,
    read_manifest,
    save_checkpoint,
)
from .errors import CheckpointNotFoundError
from .manifest import Manifest
from .options import declared_keywords, renamed
from .plugins import get_format
from .url import parse_url


def save(
    state: dict[str, Any],
    url: str,
    *,
    process_group: Any = None,
    addons: Iterable[AddonLike] = (),
    storage_options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
    final: bool = False,
    **format_options: Any,
) -> SaveResult:
    """Save ``state`` to ``url`` durably and atomically, from every rank of ``process_group``.

    :param state: a dict of tensors (DTensors included), nested dicts/lists, JSON-like values and
        ``Stateful`` objects (``ckptio.ModelState``, ``ckptio.OptimizerState``...).
    :param url: a path, ``file://``, ``s3://``, ``msc://``... optionally with a format prefix such
        as ``safetensors+s3://bucket/run``.
    :param addons: addons to run, by name or as objects.
    :param storage_options: passed to the backend (endpoint, credentials...).
    :param metadata: JSON values stored in the manifest (:attr:`Manifest.metadata`).
    :param overwrite: replace a committed checkpoint at ``url``; ``False`` raises instead.
    :param final: this is the last save of a run (addons such as ``consolidated-hf`` act on it).
    :param format_options: the format's declared save options, e.g. ``thread_count``
        (see ``docs/configuration.md``). Any other keyword raises :class:`~ckptio.OptionError`
        before anything is written.
    """
    old_final = renamed(format_options, "is_final", "final", "ckptio.save")
    final = bool(old_final) if old_final is not None else final
    u = parse_url(url)
    fmt_name = u.format or "native"
    check_call_options(format_options, _SAVE_OWN, "save", fmt_name, f"ckptio.save ({fmt_name} format)")
    u, backend = open_backend(u, storage_options)
    with backend:  # a backend opened here is closed here (client pools, event loops)
        result, _ = save_checkpoint(
            state,
            u,
            backend=backend,
            process_group=process_group,
            addons=AddonSet(addons),
            metadata=metadata,
            overwrite=overwrite,
            final=final,
            format_options=format_options,
        )
    return result


def load(
    state: dict[str, Any],
    url: str,
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
    addons: Iterable[AddonLike] = (),
    storage_options: dict[str, Any] | None = None,
    **format_options: Any,
) -> LoadResult:
    """Load the checkpoint at ``url`` into ``state`` in place, resharding to the current layout.

    :param strict: missing or unexpected keys raise :class:`~ckptio.StateMismatchError`; with
        ``False`` they are reported in the result and left alone.
    :param verify: check each chunk's checksum as it is read (on by default).
    :param format_options: the format's declared load options, e.g. ``thread_count``, or for
        foreign safetensors directories ``prefix`` and ``key_mapping``. A keyword that no
        installed format declares raises :class:`~ckptio.OptionError` before anything is read;
        one the checkpoint's format does not declare, once its manifest is read.
    """
    u = parse_url(url)
    where = f"ckptio.load ({u.format} format)" if u.format else "ckptio.load"
    check_call_options(format_options, _LOAD_OWN, "load", u.format, where)
    u, backend = open_backend(u, storage_options)
    with backend:
        return load_checkpoint(
            state,
            u,
            backend=backend,
            strict=strict,
            verify=verify,
            process_group=process_group,
            addons=AddonSet(addons),
            format_options=format_options,
        )


_SAVE_OWN = declared_keywords(save)
_LOAD_OWN = declared_keywords(load)


def manifest(url: str, *, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The manifest of the committed checkpoint at ``url``."""
    u, backend = open_backend(url, storage_options)
    with backend:
        m = read_manifest(backend, u.path)
    if m is None:
        raise CheckpointNotFoundError(f"no committed checkpoint at {u}")
    return m


def verify(url: str, *, storage_options: dict[str, Any] | None = None) -> int:
    """Re-read and check every byte of the checkpoint at ``url``; return the bytes checked.

    Raises :class:`~ckptio.CorruptCheckpointError` naming the first damaged file.
    """
    import xxhash

    from .errors import CorruptCheckpointError

    u, backend = open_backend(url, storage_options)
    with backend:
        m = read_manifest(backend, u.path)
        if m is None:
            raise CheckpointNotFoundError(f"no committed checkpoint at {u}")
        checked = get_format(m.format).verify(backend, u.path, m)
        for name, info in m.files.items():
            digest = info.get("xxh3")
            if digest is None:
                continue
            p = backend.join(u.path, name)
            data = read_limited(backend, p, int(info["size"]), "artifact")
            if len(data) != info["size"] or xxhash.xxh3_64_hexdigest(data) != digest:
                raise CorruptCheckpointError(
                    f"checksum mismatch in {backend.url(p)}: the file is damaged", path=p
                )
            checked += len(data)
        return checked
