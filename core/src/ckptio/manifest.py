"""``manifest.json``: the commit record of one checkpoint.

Written last, by the coordinator, after every rank's data is durable. It lists every file with its
size, holds the format's metadata (as JSON, never pickle), the step, metrics and active addons, and
a checksum of itself, so a flipped byte in the manifest is detected like one in the data.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import xxhash

from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .url import join_path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
#: The largest manifest ckptio reads. About 700k chunks (storage entries) fit: a model of 1,000
#: tensors sharded over 512 ranks needs ~90 MB less than this. Parsing one this size takes about
#: a second and 1-2 GB of Python objects; anything larger is refused before it is read.
MAX_MANIFEST_BYTES = 64 << 20
#: At most this many files, chunks or storage entries in one manifest (64 MiB holds fewer).
MAX_ENTRIES = 1 << 20
#: A declared file size above this (256 TiB) is refused; sizes are also compared with the real files.
MAX_FILE_BYTES = 1 << 48
#: Nesting depth allowed in ``metadata`` (key ``"user"``) and metrics (JSON objects and lists).
MAX_USER_DEPTH = 32
#: ``created`` must lie between the epoch and this (the year 5138).
MAX_CREATED = 1e11
_MAX_WORLD = 1 << 31


def check_file_name(name: str, where: str) -> None:
    """A file name from checkpoint metadata must stay inside the checkpoint (no ``..``, not
    absolute): :class:`~ckptio.errors.UnsafeCheckpointError` otherwise."""
    try:
        join_path("/x", name)
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"{where}: file name {name!r} escapes the checkpoint", path=where
        ) from exc


#: Fields stored under another key in ``manifest.json``. ``metadata`` (the user's ``metadata=``)
#: keeps the key ``"user"`` it had before it was renamed: readers check the manifest's fields
#: strictly and its checksum covers the keys, so a new key would make every checkpoint written
#: from now on unreadable by earlier ckptio releases.
_JSON_KEYS = {"metadata": "user"}
_FIELDS = {v: k for k, v in _JSON_KEYS.items()}


@dataclass
class Manifest:
    """What a committed checkpoint contains. ``files`` maps relative names to ``{"size": n, ...}``;
    ``metadata`` holds the JSON values passed as ``save(..., metadata=...)`` (key ``"user"`` in
    ``manifest.json``)."""

    format: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    format_metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    world_size: int = 1
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    addons: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    ckptio_manifest: int = MANIFEST_VERSION

    @property
    def user(self) -> dict[str, Any]:
        """Deprecated: :attr:`metadata` (the name ``save(metadata=...)`` uses)."""
        warnings.warn("Manifest.user is deprecated, use Manifest.metadata", DeprecationWarning, stacklevel=2)
        return self.metadata

    @user.setter
    def user(self, value: dict[str, Any]) -> None:
        warnings.warn("Manifest.user is deprecated, use Manifest.metadata", DeprecationWarning, stacklevel=2)
        self.metadata = value

    @property
    def total_bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    def to_bytes(self) -> bytes:
        # Compact JSON both times: ``indent`` would switch json to its pure-Python encoder, and a
        # shallow dict avoids ``asdict``'s deep copy; together they cost ~0.1 s per save for 200
        # tensors, seconds for a large sharded model. ``jq . manifest.json`` pretty-prints it.
        body = {_JSON_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        body["checksum"] = "xxh3_64:" + xxhash.xxh3_64_hexdigest(text.encode())
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest; any defect is a :class:`CorruptCheckpointError`.

        Callers read ``data`` with :func:`ckptio.backend.read_limited` and
        :data:`MAX_MANIFEST_BYTES`, so that an oversized file is refused before it is read.
        The format's metadata is checked by the format when it is used.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{where}: manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed; refusing",
                path=where,
            )
        try:
            with no_gc():
                body = json.loads(data.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})", path=where) from exc
        if not isinstance(body, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object", path=where)
        checksum = body.pop("checksum", None)
        for key in ("user", "metrics"):
            if _too_deep(body.get(key), MAX_USER_DEPTH):
                raise CorruptCheckpointError(
                    f"{where}: manifest field {key!r} is nested more than {MAX_USER_DEPTH} levels deep",
                    path=where,
                )
        if not (isinstance(checksum, str) and _canonical_checksum_ok(data, checksum)):
            # not laid out as ckptio writes it (e.g. pretty-printed): hash the canonical form
            try:
                text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
            except ValueError as exc:
                raise CorruptCheckpointError(f"{where}: manifest holds invalid numbers", path=where) from exc
            except RecursionError as exc:
                raise CorruptCheckpointError(f"{where}: manifest is nested too deeply", path=where) from exc
            if checksum != "xxh3_64:" + xxhash.xxh3_64_hexdigest(text.encode()):
                raise CorruptCheckpointError(
                    f"{where}: manifest checksum mismatch (the file is damaged)", path=where
                )
        if body.get("ckptio_manifest") != MANIFEST_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest version {body.get('ckptio_manifest')!r} is not supported by this ckptio",
                path=where,
            )
        try:
            if renamed := sorted(set(body) & set(_JSON_KEYS)):  # field names are not JSON keys
                raise TypeError(f"unexpected keys {renamed}")
            fields_: dict[str, Any] = {_FIELDS.get(str(k), str(k)): v for k, v in body.items()}
            m = cls(**fields_)
        except TypeError as exc:
            raise CorruptCheckpointError(f"{where}: unexpected manifest fields ({exc})", path=where) from exc
        if not (
            isinstance(m.format, str)
            and isinstance(m.files, dict)
            and isinstance(m.format_metadata, dict)
            and _is_int(m.world_size)
            and (m.step is None or _is_int(m.step))
            and isinstance(m.metrics, dict)
            and isinstance(m.addons, list)
            and all(isinstance(a, str) for a in m.addons)
            and isinstance(m.metadata, dict)
            and isinstance(m.created, (int, float))
            and not isinstance(m.created, bool)
        ):
            raise CorruptCheckpointError(f"{where}: manifest fields have the wrong types", path=where)
        if not 0 <= m.created <= MAX_CREATED:  # also refuses NaN
            raise CorruptCheckpointError(f"{where}: creation time {m.created!r} is out of range", path=where)
        if not 1 <= m.world_size <= _MAX_WORLD or (m.step is not None and not 0 <= m.step < 1 << 63):
            raise CorruptCheckpointError(f"{where}: world size or step out of range", path=where)
        if len(m.files) > MAX_ENTRIES or len(m.addons) > MAX_ENTRIES:
            raise CorruptCheckpointError(f"{where}: manifest lists too many files", path=where)
        for name, info in m.files.items():
            check_file_name(name, where)
            size = info.get("size") if isinstance(info, dict) else None
            if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
                raise CorruptCheckpointError(f"{where}: bad size for {name!r}", path=where)
        return m


#: The checksum member as :meth:`Manifest.to_bytes` writes it: second, after ``addons`` (a list
#: of strings, whose quotes would be escaped), so its first match is the real one.
_CHECKSUM_MEMBER = re.compile(rb',"checksum":"(xxh3_64:[0-9a-f]{16})"')


def _canonical_checksum_ok(data: bytes, checksum: str) -> bool:
    """Whether ``data`` is laid out exactly as :meth:`Manifest.to_bytes` writes it and, without
    its checksum member, hashes to ``checksum``: then the canonical re-encoding that the checksum
    covers is those very bytes, and encoding it again (as long as parsing it) is not needed."""
    if not data.startswith(b'{"addons":['):
        return False
    m = _CHECKSUM_MEMBER.search(data)
    if m is None or m.group(1) != checksum.encode():
        return False
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    h = xxhash.xxh3_64()
    h.update(memoryview(data)[: m.start()])
    h.update(memoryview(data)[m.end() : end])
    return "xxh3_64:" + h.hexdigest() == checksum


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many acyclic objects (parsed JSON):
    its collections, triggered by the allocations alone, can double the time of a large parse."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (iterative, so depth cannot overflow)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            items: Any = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))
    return False
