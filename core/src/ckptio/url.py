"""Parse checkpoint URLs: ``[format+]scheme://location`` or a plain path.

``safetensors+s3://bucket/run`` selects the ``safetensors`` format on the ``s3`` backend, the way
SQLAlchemy spells ``dialect+driver``. A plain path (or ``file:///abs``) is the local backend. The
location keeps the backend's own spelling (``bucket/key`` for object stores, an absolute path
locally), so backends never re-parse URLs.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, replace

from .errors import InvalidURLError

_URL_RE = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9.+-]*)://(?P<rest>.*)$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9.-]*$")


@dataclass(frozen=True)
class URL:
    """A parsed checkpoint location.

    :ivar format: the format named by a ``format+`` prefix, or ``None`` (native on save, detected
        on load).
    :ivar scheme: the storage scheme (``file`` for plain paths).
    :ivar path: the location inside the backend: an absolute POSIX path for ``file``, otherwise the
        text after ``scheme://`` without trailing slashes (``bucket/prefix`` or ``profile/key``).
    """

    scheme: str
    path: str
    format: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.format}+" if self.format else ""
        if self.scheme == "file":
            return f"{prefix}file://{self.path}" if prefix else self.path
        return f"{prefix}{self.scheme}://{self.path}"

    @property
    def storage_url(self) -> str:
        """The URL without its format prefix (what the storage backend sees)."""
        return str(replace(self, format=None))

    def join(self, *parts: str) -> URL:
        """A child location; refuses parts that would escape this one (``..``, absolute)."""
        return replace(self, path=join_path(self.path, *parts))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> URL:
        return replace(self, path=posixpath.dirname(self.path.rstrip("/")) or self.path)

    def with_format(self, fmt: str | None) -> URL:
        return replace(self, format=fmt)


def join_path(base: str, *parts: str) -> str:
    """Join relative parts to ``base``; ``..``, absolute and empty parts are refused.

    Every name that comes out of a checkpoint (a pointer, a file in a manifest) goes through here,
    so a hostile checkpoint cannot make ckptio read or delete outside its own directory.
    """
    segs: list[str] = []
    for part in parts:
        for seg in part.split("/"):
            if seg in ("", "."):
                continue
            if seg == ".." or "\\" in seg or "\x00" in seg:
                raise InvalidURLError(f"refusing path component {part!r}: it would leave {base!r}")
            segs.append(seg)
    if not segs:
        return base
    if not base:
        return "/".join(segs)
    return base.rstrip("/") + "/" + "/".join(segs)


def parse_url(url: str | os.PathLike[str] | URL) -> URL:
    """Parse ``url`` into a :class:`URL`; raise :class:`InvalidURLError` when malformed."""
    if isinstance(url, URL):
        return url
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise InvalidURLError("empty checkpoint URL")
    if "\x00" in text:
        raise InvalidURLError(f"NUL byte in checkpoint URL {text!r}")
    m = _URL_RE.match(text)
    if m is None:
        if "://" in text:
            raise InvalidURLError(f"malformed URL {text!r}: expected scheme://location")
        return URL(scheme="file", path=os.path.abspath(os.path.expanduser(text)))
    names = m.group("prefix").lower().split("+")
    if any(not _NAME_RE.match(n) for n in names) or len(names) > 2:
        raise InvalidURLError(f"malformed URL {text!r}: the prefix must be scheme:// or format+scheme://")
    fmt = names[0] if len(names) == 2 else None
    scheme = names[-1]
    rest = m.group("rest")
    if scheme in ("file", "local"):
        if not rest.startswith("/"):
            raise InvalidURLError(f"malformed URL {text!r}: file:// URLs need an absolute path (file:///abs)")
        return URL(scheme="file", path=os.path.normpath(rest), format=fmt)
    rest = re.sub("/{2,}", "/", rest).strip("/")
    if not rest:
        raise InvalidURLError(f"malformed URL {text!r}: no bucket or location after {scheme}://")
    return URL(scheme=scheme, path=rest, format=fmt)
