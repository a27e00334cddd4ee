"""Peer replication for :class:`~ckptio.tiered.TieredCheckpointManager`: copy files between the
local tiers of two nodes over ``torch.distributed`` point-to-point messages (docs/tiered.md).

The byte mover only; the tiered manager (:mod:`ckptio.peer_copies`) decides what moves where,
prepares and commits the receiving directories. A plan is a list of :class:`Transfer`, the same
on every rank (built from values every rank gathered); each rank sends the transfers whose
``src`` it is, from a thread of its own, while its calling thread receives those whose ``dst`` it
is, both in the plan's order.
The first pending transfer of the plan always has both ends at it, so the exchange cannot
deadlock, whatever the ranks hold: a sender that cannot read a file still sends its agreed
number of bytes (zeros), and the receiver's checksum rejects them.

Each file travels in chunks of at most :data:`CHUNK` bytes, so memory stays bounded (one chunk
per direction per rank). Transfers are not encrypted or compressed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import xxhash

from .backend import Backend
from .errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger("ckptio.peer")

#: The directory, under a node's local tier, holding the copies it keeps for its peer.
PEERS_DIR = "peers"
#: Bytes per message.
CHUNK = 4 << 20
#: The tag of every peer message (gloo matches a receive by source rank and tag).
TAG = 1521


def peer_of(node: int, n_nodes: int) -> int:
    """The node that keeps a copy of ``node``'s files: the next one, cyclically."""
    return (node + 1) % n_nodes


def node_dir_name(node: int) -> str:
    return f"node_{node:05d}"


_NODE_RE = re.compile(r"^node_([0-9]{5,9})$")


def parse_node_dir(name: str) -> int | None:
    """The node whose copies ``name`` holds, for a canonical :func:`node_dir_name` only
    (``node_000001`` or ``node_1`` are no one's)."""
    m = _NODE_RE.match(name)
    if m is None:
        return None
    node = int(m.group(1))
    return node if node_dir_name(node) == name else None


def safe_name(name: str) -> bool:
    """``name`` is a relative path below its directory: no ``..``, ``.`` or empty part, no
    absolute path, no backslash or NUL (a manifest's file names, checked again on receipt)."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


@dataclass(frozen=True)
class Transfer:
    """One file to move: ``src_dir/name`` on rank ``src`` -> the receiving directory ``key`` on
    rank ``dst`` (ranks of the manager's process group)."""

    name: str
    size: int
    xxh3: str
    src: int
    dst: int
    src_dir: str
    key: int


def plan(
    files: Sequence[tuple[str, int, str]],
    senders: Sequence[int],
    receivers: Sequence[int],
    src_dir: str,
    key: int,
) -> list[Transfer]:
    """Spread ``files`` (``(name, size, xxh3)``) over the sending and receiving ranks, round robin
    by name: deterministic, so every rank builds the same plan."""
    return [
        Transfer(
            name,
            int(size),
            str(digest),
            senders[i % len(senders)],
            receivers[i % len(receivers)],
            src_dir,
            key,
        )
        for i, (name, size, digest) in enumerate(sorted(files))
    ]


def _fill(f: Any, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read."""
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:]) or 0
        else:
            data = f.read(len(view) - got)
            n = len(data)
            view[got : got + n] = data
        if not n:
            break
        got += n
    return got


def _send_all(backend: Backend, sends: list[Transfer], group: Any) -> dict[int, BaseException]:
    import torch
    import torch.distributed as dist

    errors: dict[int, BaseException] = {}
    buf = bytearray(min(CHUNK, max((t.size for t in sends), default=0)) or 1)
    for t in sends:
        path = backend.join(t.src_dir, *t.name.split("/"))
        err: BaseException | None = None
        with _Opened(backend, path) as f:
            if f is None:
                err = CorruptCheckpointError(f"{backend.url(path)} cannot be read for peer replication")
            left = t.size
            while left:
                n = min(len(buf), left)
                view = memoryview(buf)[:n]
                got = 0
                if f is not None:
                    try:
                        got = _fill(f, view)
                    except Exception as exc:  # keep the stream going: the receiver rejects it
                        err = err or exc
                        f = None
                if got < n:
                    view[got:] = bytes(n - got)
                    if err is None:
                        err = CorruptCheckpointError(
                            f"{backend.url(path)} is shorter than its {t.size} bytes", path=backend.url(path)
                        )
                dist.send(torch.frombuffer(view, dtype=torch.uint8), group=group, group_dst=t.dst, tag=TAG)
                left -= n
        if err is not None:
            errors.setdefault(t.key, err)
    return errors


class _Opened:
    """``backend.open_read(path)`` as a context that yields ``None`` when the file cannot be opened."""

    def __init__(self, backend: Backend, path: str) -> None:
        self.backend, self.path = backend, path
        self.cm: Any = None

    def __enter__(self) -> Any:
        try:
            self.cm = self.backend.open_read(self.path)
            return self.cm.__enter__()
        except Exception:
            self.cm = None
            return None

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            try:
                self.cm.__exit__(None, None, None)
            except Exception:
                pass


def _recv_all(
    backend: Backend, recvs: list[Transfer], dirs: dict[int, str], group: Any
) -> dict[int, BaseException]:
    import torch
    import torch.distributed as dist

    errors: dict[int, BaseException] = {}
    store = bytearray(min(CHUNK, max((t.size for t in recvs), default=0)) or 1)
    buf = torch.frombuffer(store, dtype=torch.uint8)  # shares ``store``'s memory
    raw = memoryview(store)
    for t in recvs:
        parts = t.name.split("/")
        base = dirs.get(t.key)
        path = t.name
        failure: BaseException | None = None
        cm: Any = None
        sink: Any = None
        if base is None:
            failure = CheckpointError(f"no receiving directory for {t.name}")
        elif not safe_name(t.name):  # defence in depth: the plan comes from manifests, checked already
            failure = CorruptCheckpointError(
                f"refusing to receive {t.name!r}: not a plain relative file name"
            )
        else:
            try:
                path = backend.join(base, *parts)
                if len(parts) > 1:
                    backend.makedirs(backend.join(base, *parts[:-1]))
                cm = backend.open_write(path)
                sink = cm.__enter__()
            except Exception as exc:  # the bytes are received all the same: the sender does not stop
                failure, cm, sink = exc, None, None
        h = xxhash.xxh3_64()
        left = t.size
        while left:
            n = min(buf.numel(), left)
            dist.recv(buf[:n], group=group, group_src=t.src, tag=TAG)
            h.update(raw[:n])
            if sink is not None:
                try:
                    sink.write(raw[:n])
                except Exception as exc:
                    failure, sink = exc, None
            left -= n
        if failure is None and h.hexdigest() != t.xxh3:
            failure = CorruptCheckpointError(
                f"{t.name} (from rank {t.src}) failed its checksum on receipt", path=backend.url(path)
            )
        if cm is not None:
            try:  # an error leaves nothing at ``path`` (open_write's contract)
                cm.__exit__(*((None, None, None) if failure is None else (type(failure), failure, None)))
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            errors.setdefault(t.key, failure)
    return errors


def exchange(
    backend: Backend, transfers: list[Transfer], rank: int, dirs: dict[int, str], group: Any
) -> dict[int, BaseException]:
    """Run this rank's part of a plan: send its files, receive others' into ``dirs[key]``
    (checked against their xxh3 as they arrive). Returns this rank's first failure per key;
    every agreed byte is sent and received whatever fails, so the other ranks are never left waiting."""
    sends = [t for t in transfers if t.src == rank and t.size]
    recvs = [t for t in transfers if t.dst == rank]
    with ThreadPoolExecutor(1, thread_name_prefix="ckptio-peer-send") as pool:
        fut = pool.submit(_send_all, backend, sends, group) if sends else None
        errors = _recv_all(backend, recvs, dirs, group) if recvs else {}
        sent = fut.result() if fut is not None else {}
    return {**sent, **errors}
