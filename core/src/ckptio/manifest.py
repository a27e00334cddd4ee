"""``manifest.json``: the commit record of one checkpoint.

Written last, by the coordinator, after every rank's data is durable. It lists every file with its
size, holds the format's metadata (as JSON, never pickle), the step, metrics and active addons, and
a checksum of itself, so a flipped byte in the manifest is detected like one in the data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any

import xxhash

from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .url import join_path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30


@dataclass
class Manifest:
    """What a committed checkpoint contains. ``files`` maps relative names to ``{"size": n, ...}``."""

    format: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    format_metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    world_size: int = 1
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    addons: list[str] = field(default_factory=list)
    user: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    ckptio_manifest: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    def to_bytes(self) -> bytes:
        # Compact JSON both times: ``indent`` would switch json to its pure-Python encoder, and a
        # shallow dict avoids ``asdict``'s deep copy; together they cost ~0.1 s per save for 200
        # tensors, seconds for a large sharded model. ``jq . manifest.json`` pretty-prints it.
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        body["checksum"] = "xxh3_64:" + xxhash.xxh3_64_hexdigest(text.encode())
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest; any defect is a :class:`CorruptCheckpointError`."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest is {len(data)} bytes, refusing", path=where)
        try:
            body = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})", path=where) from exc
        if not isinstance(body, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object", path=where)
        checksum = body.pop("checksum", None)
        try:
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{where}: manifest holds invalid numbers", path=where) from exc
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
            m = cls(**body)
        except TypeError as exc:
            raise CorruptCheckpointError(f"{where}: unexpected manifest fields ({exc})", path=where) from exc
        if not (
            isinstance(m.format, str)
            and isinstance(m.files, dict)
            and isinstance(m.format_metadata, dict)
            and isinstance(m.world_size, int)
            and (m.step is None or (isinstance(m.step, int) and not isinstance(m.step, bool)))
            and isinstance(m.metrics, dict)
            and isinstance(m.addons, list)
            and all(isinstance(a, str) for a in m.addons)
            and isinstance(m.user, dict)
            and isinstance(m.created, (int, float))
        ):
            raise CorruptCheckpointError(f"{where}: manifest fields have the wrong types", path=where)
        for name, info in m.files.items():
            try:
                join_path("/x", name)
            except Exception as exc:
                raise UnsafeCheckpointError(
                    f"{where}: file name {name!r} escapes the checkpoint", path=where
                ) from exc
            size = info.get("size") if isinstance(info, dict) else None
            if not isinstance(size, int) or size < 0:
                raise CorruptCheckpointError(f"{where}: bad size for {name!r}", path=where)
        return m
