"""``ckptio.save`` and ``ckptio.load``: one checkpoint at one URL."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .addons import AddonSet, AddonSpecLike
from .backend import read_limited
from .checkpoint import LoadResult, SaveResult, load_checkpoint, open_backend, read_manifest, save_checkpoint
from .errors import CheckpointNotFoundError
from .manifest import Manifest
from .plugins import get_format


def save(
    state: dict[str, Any],
    url: str,
    *,
    process_group: Any = None,
    addons: Iterable[AddonSpecLike] = (),
    storage_options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
    **options: Any,
) -> SaveResult:
    """Save ``state`` to ``url`` durably and atomically, from every rank of ``process_group``.

    :param state: a dict of tensors (DTensors included), nested dicts/lists, JSON-like values and
        ``Stateful`` objects (``ckptio.ModelState``, ``ckptio.OptimizerState``...).
    :param url: a path, ``file://``, ``s3://``, ``msc://``... optionally with a format prefix such
        as ``safetensors+s3://bucket/run``.
    :param addons: addons to run, by name or as objects.
    :param storage_options: passed to the backend (endpoint, credentials...).
    :param metadata: JSON values stored in the manifest (``user``).
    :param options: format options, e.g. ``thread_count``.
    """
    u, backend = open_backend(url, storage_options)
    with backend:  # a backend opened here is closed here (client pools, event loops)
        result, _ = save_checkpoint(
            state,
            u,
            backend=backend,
            process_group=process_group,
            addons=AddonSet(addons),
            user_metadata=metadata,
            overwrite=overwrite,
            **options,
        )
    return result


def load(
    state: dict[str, Any],
    url: str,
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
    addons: Iterable[AddonSpecLike] = (),
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> LoadResult:
    """Load the checkpoint at ``url`` into ``state`` in place, resharding to the current layout.

    :param strict: missing or unexpected keys raise :class:`~ckptio.StateMismatchError`; with
        ``False`` they are reported in the result and left alone.
    :param verify: check each chunk's checksum as it is read (on by default).
    """
    u, backend = open_backend(url, storage_options)
    with backend:
        return load_checkpoint(
            state,
            u,
            backend=backend,
            strict=strict,
            verify=verify,
            process_group=process_group,
            addons=AddonSet(addons),
            **options,
        )


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
