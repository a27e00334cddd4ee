"""A pytest contract for ckptio backends: subclass :class:`BackendContract`, give it one fixture.

Requires pytest (``pip install 'ckptio[testing]'``); nothing else in ckptio imports this module.

::

    import pytest
    from ckptio.testing import BackendContract

    class TestMyStore(BackendContract):
        @pytest.fixture(scope="class")
        def backend_url(self):
            return "mystore://contract-bucket"  # or (url, storage_options)

``backend_url`` names a location on a scheme that ckptio can open (installed as a plugin, or
registered with :func:`ckptio.register_backend`); it may have any scope. The kit opens it once
per class with :func:`ckptio.ext.open_backend`, gives each test a new empty root below it
(``<url>/contract-<random>``), runs the contract against the backend through direct calls and
through ``ckptio.save``/``ckptio.load`` of that root's URL, and removes the root afterwards.

What is checked (each test's docstring says more): the declared commit mode (a ``rename`` store
publishes a staged directory whole; a ``marker`` store writes in place and the manifest written
last commits), atomic visibility of ``open_write`` and ``create_bytes``, ranged reads
(``read_bytes``, ``read_into``, reads past the end), listing, removal, errors (ckptio's hierarchy,
never a driver's exception) and bounded memory when writing and reading a large file in chunks.

Class attributes tune the kit: :attr:`~BackendContract.memory_limit`,
:attr:`~BackendContract.large_size`, :attr:`~BackendContract.chunk_size`,
:attr:`~BackendContract.holds_data_in_memory`, and :attr:`~BackendContract.expected_failures`
(``{"test_name": "reason"}``: those tests are marked ``xfail(strict=True)``, so a fix is noticed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    import pytest
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckptio.testing is a pytest toolkit: pip install 'ckptio[testing]' (or pytest)"
    ) from exc

from .backend import Backend
from .errors import CheckpointError, CheckpointNotFoundError, ConcurrentWriteError, CorruptCheckpointError
from .ext import Target, open_backend
from .url import URL

__all__ = ["BackendContract", "ContractStore"]

MiB = 1 << 20
_MANIFEST = "manifest.json"
#: files of the listing and removal tests: siblings share prefixes (d, d2, dx; a.bin)
_TREE = ("a.bin", "d/b.bin", "d/e/c.bin", "d2/x.bin", "dx")


@dataclass
class ContractStore:
    """What each contract test gets: the backend, opened on a fresh root, and that root."""

    backend: Backend
    #: the root's path in the backend's own spelling (what follows ``scheme://``)
    root: str
    #: the root as a URL (``ckptio.save``/``load`` take ``str(url.join(...))``)
    url: URL
    storage_options: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        """A backend path below the root."""
        return self.backend.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """A URL below the root, for ``ckptio.save``/``ckptio.load``."""
        return str(self.url.join(*parts))

    def parent(self, path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[0]

    def put(self, rel: str, data: bytes) -> str:
        """Write ``data`` at ``rel`` below the root through ``open_write`` (parents made first)."""
        path = self.path(rel)
        self.backend.makedirs(self.parent(path))
        with self.backend.open_write(path) as f:
            f.write(data)
        return path


class _Boom(Exception):
    """Raised inside ``open_write`` blocks by the kit."""


def _pattern(n: int) -> bytes:
    """``n`` random bytes: a misplaced range cannot read back equal."""
    return os.urandom(n)


def _name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__} ({str(exc)[:200]})"


def _ckptio_error(fn: Callable[[], Any], what: str) -> CheckpointError:
    """Run ``fn``; it must raise a ckptio error (returned), never succeed or raise anything else."""
    try:
        fn()
    except CheckpointError as exc:
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what} raised {_name(exc)}, not a ckptio error "
            "(ckptio.errors: CheckpointNotFoundError, StorageError...)"
        ) from exc
    raise AssertionError(f"{what} did not raise")


@contextlib.contextmanager
def _traced() -> Iterator[Callable[[], tuple[int, int]]]:
    """Trace Python allocations; ``measure()`` gives ``(current, peak)`` bytes since the start.

    The buffers a test allocated before (source data, destination) are not counted. Works when
    tracing is already on (``-X tracemalloc``): then the peak is reset and tracing left running.
    """
    gc.collect()
    running = tracemalloc.is_tracing()
    if not running:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]

    def measure() -> tuple[int, int]:
        current, peak = tracemalloc.get_traced_memory()
        return current - base, peak - base

    try:
        yield measure
    finally:
        if not running:
            tracemalloc.stop()


def _manifest(files: dict[str, dict[str, Any]]) -> bytes:
    """A stand-in manifest for direct :class:`~ckptio.ext.Target` tests: the files it lists."""
    return json.dumps({"contract": True, "files": files}, sort_keys=True).encode()


def _clean(backend: Backend, root: str) -> None:
    """Remove what a test left under ``root``: file by file (a recursive delete costs about a
    second on some object-store clients), then the directories that remain, if any."""
    for rel in list(backend.walk_files(root)):
        backend.remove(backend.join(root, rel))
    if backend.exists(root):
        backend.remove(root, recursive=True)


def _read_stream(backend: Backend, path: str) -> bytes:
    with backend.open_read(path) as f:
        return f.read()


class BackendContract:
    """The contract every ckptio backend keeps. Subclass it in a ``Test*`` class and define the
    ``backend_url`` fixture (see the module docstring)."""

    #: Bytes written and read by the bounded-memory tests.
    large_size: ClassVar[int] = 64 * MiB
    #: Size of each ``write()`` in the bounded-memory test (and of the aborted write).
    chunk_size: ClassVar[int] = 4 * MiB
    #: Most bytes of Python allocations (``tracemalloc``) a large write or ``read_into`` may use
    #: at its peak, apart from the source and destination buffers. ``None`` skips those tests.
    memory_limit: ClassVar[int | None] = 16 * MiB
    #: The store itself keeps the bytes in this process (``memory://``, a dict): what it retains
    #: after the write is not counted, only the transient allocations above it.
    holds_data_in_memory: ClassVar[bool] = False
    #: ``{"test_name": "why"}``: known failures, marked ``xfail(strict=True)``.
    expected_failures: ClassVar[Mapping[str, str]] = {}

    # -- fixtures ---------------------------------------------------------------------------
    @pytest.fixture
    def backend_url(self) -> Any:
        """Override: a location the kit may write under, as ``url`` or ``(url, storage_options)``.

        Any scope: each test works in a new sub-directory of it, so one bucket or directory per
        class (``scope="class"``) is enough and saves creating clients for every test.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define a `backend_url` fixture returning a URL "
            "(or (url, storage_options)) the contract tests may write under"
        )

    @pytest.fixture(scope="class")
    def _contract_backends(self) -> Iterator[dict[tuple[str, str], tuple[URL, Backend]]]:
        """Backends opened for this class, one per distinct ``backend_url``; closed at the end."""
        opened: dict[tuple[str, str], tuple[URL, Backend]] = {}
        yield opened
        for _, backend in opened.values():
            with contextlib.suppress(Exception):
                backend.close()

    @pytest.fixture
    def contract_store(
        self, backend_url: Any, _contract_backends: dict[tuple[str, str], tuple[URL, Backend]]
    ) -> Iterator[ContractStore]:
        """The backend and a new, empty root below ``backend_url`` for one test."""
        if isinstance(backend_url, (str, URL)):
            url, options = str(backend_url), {}
        else:
            url, options = str(backend_url[0]), dict(backend_url[1] or {})
        key = (url, repr(sorted(options.items())))
        if key not in _contract_backends:
            _contract_backends[key] = open_backend(url, options)
        base, backend = _contract_backends[key]
        name = f"contract-{uuid.uuid4().hex[:12]}"
        root = backend.join(base.path, name)
        entries = backend.listdir(root)
        assert entries == [], f"{backend.url(root)} must be empty at the start of a test; it holds {entries}"
        try:
            yield ContractStore(backend, root, base.join(name), options)
        finally:
            with contextlib.suppress(Exception):
                _clean(backend, root)

    @pytest.fixture(autouse=True)
    def _contract_expected_failures(self, request: pytest.FixtureRequest) -> None:
        unknown = set(self.expected_failures) - set(contract_tests())
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.expected_failures names no contract test: {sorted(unknown)}"
            )
        reason = self.expected_failures.get(request.function.__name__)
        if reason:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    # -- commit mode --------------------------------------------------------------------------
    def test_commit_mode_declared(self, contract_store: ContractStore) -> None:
        """``commit_mode`` is ``"rename"`` or ``"marker"``; a rename store implements ``rename``."""
        cls = type(contract_store.backend)
        assert cls.commit_mode in ("rename", "marker"), f"commit_mode {cls.commit_mode!r}"
        if cls.commit_mode == "rename":
            assert cls.rename is not Backend.rename, "commit_mode 'rename' needs an atomic rename()"
        assert isinstance(cls.atomic_create, bool)

    def test_rename_publishes_whole_directory(self, contract_store: ContractStore) -> None:
        """Rename stores: a staged directory appears whole under its new name, in one rename;
        a rename onto a non-empty directory is refused (the commit protocol relies on it)."""
        b = contract_store.backend
        if b.commit_mode != "rename":
            pytest.skip("marker store: nothing is renamed")
        staging, final = contract_store.path(".step.partial"), contract_store.path("step")
        a, sub = _pattern(1000), _pattern(10)
        contract_store.put(".step.partial/a.bin", a)
        contract_store.put(".step.partial/sub/b.bin", sub)
        assert not b.exists(final)
        b.rename(staging, final)
        b.fsync_dir(contract_store.root)
        assert not b.exists(staging)
        assert sorted(b.listdir(contract_store.root)) == ["step"]
        assert sorted(b.walk_files(final)) == ["a.bin", "sub/b.bin"]
        assert b.read_bytes(b.join(final, "a.bin")) == a
        assert b.read_bytes(b.join(final, "sub/b.bin")) == sub

        contract_store.put(".other.partial/c.bin", b"c")
        _ckptio_error(
            lambda: b.rename(contract_store.path(".other.partial"), final), "rename onto a non-empty dir"
        )
        assert sorted(b.walk_files(final)) == ["a.bin", "sub/b.bin"]
        assert b.read_bytes(contract_store.path(".other.partial/c.bin")) == b"c"

    def test_commit_protocol(self, contract_store: ContractStore) -> None:
        """A publication (``ckptio.ext.Target``) on this store: rename stores stage and rename,
        marker stores write in place and the manifest, written last, commits. Nothing else is
        left beside the checkpoint, and a committed one is not replaced without ``overwrite``."""
        b = contract_store.backend
        final = contract_store.path("step_1")
        target = Target.prepare(b, final, overwrite=False, what="the contract step")
        if b.commit_mode == "marker":
            assert target.data_dir == final, "marker stores write in place"
        else:
            assert target.data_dir != final, "rename stores write into a staging directory"
        files = {"data.bin": _pattern(3000), "sub/x.bin": _pattern(17)}
        for rel, data in files.items():
            b.makedirs(contract_store.parent(b.join(target.data_dir, rel)))
            with b.open_write(b.join(target.data_dir, rel)) as f:
                f.write(data)
        if b.commit_mode == "rename":
            assert not b.exists(final), "a staged checkpoint is invisible before its rename"
        assert not b.exists(b.join(final, _MANIFEST))
        listed = {rel: {"size": len(d)} for rel, d in files.items()}
        target.check_files(listed)
        manifest = _manifest(listed)
        target.commit(manifest)
        assert b.read_bytes(b.join(final, _MANIFEST)) == manifest
        assert sorted(b.walk_files(final)) == sorted([*files, _MANIFEST])
        for rel, data in files.items():
            assert b.read_bytes(b.join(final, rel)) == data
        assert b.listdir(contract_store.root) == ["step_1"], "staging or lease entries were left behind"
        _ckptio_error(
            lambda: Target.prepare(b, final, overwrite=False, what="the contract step"),
            "a second publication",
        )

    def test_two_writers_one_wins(self, contract_store: ContractStore) -> None:
        """Two publications of one step without ``overwrite``: exactly one commits, whole; the
        other gets ``ConcurrentWriteError`` (rename stores, and marker stores with
        ``atomic_create``; others have no atomic primitive to decide)."""
        b = contract_store.backend
        if b.commit_mode == "marker" and not b.atomic_create:
            pytest.skip("marker store without atomic_create: the last manifest wins")
        final = contract_store.path("step_2")
        first = Target.prepare(b, final, overwrite=False, what="step 2 (first writer)")
        second = Target.prepare(b, final, overwrite=False, what="step 2 (second writer)")
        manifests = {}
        for t, name in ((first, "first.bin"), (second, "second.bin")):
            with b.open_write(b.join(t.data_dir, name)) as f:
                f.write(name.encode())
            listed = {name: {"size": len(name)}}
            t.check_files(listed)
            manifests[name] = _manifest(listed)
        first.commit(manifests["first.bin"])
        with pytest.raises(ConcurrentWriteError):
            second.commit(manifests["second.bin"])
        assert b.read_bytes(b.join(final, _MANIFEST)) == manifests["first.bin"]
        assert b.read_bytes(b.join(final, "first.bin")) == b"first.bin"
        if b.commit_mode == "rename":
            assert sorted(b.listdir(final)) == ["first.bin", _MANIFEST]
        assert b.listdir(contract_store.root) == ["step_2"], "staging or lease entries were left behind"

    def test_save_load_round_trip(self, contract_store: ContractStore) -> None:
        """``ckptio.save``/``load``/``verify`` and a ``CheckpointManager`` through the URL."""
        import torch

        import ckptio

        opts = contract_store.storage_options
        state: dict[str, Any] = {
            "w": torch.arange(24, dtype=torch.float32).reshape(4, 6),
            "b": torch.ones(5, dtype=torch.bfloat16),
            "empty": torch.zeros(0),
            "step": 3,
            "meta": {"name": "contract", "lr": 0.5},
        }

        def blank() -> dict[str, Any]:
            return {
                "w": torch.zeros(4, 6),
                "b": torch.zeros(5, dtype=torch.bfloat16),
                "empty": torch.ones(0),
                "step": 0,
                "meta": {"name": "", "lr": 0.0},
            }

        url = contract_store.url_of("ckpt")
        ckptio.save(state, url, storage_options=opts)
        out = blank()
        ckptio.load(out, url, storage_options=opts)
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
        assert out["step"] == 3 and out["meta"] == {"name": "contract", "lr": 0.5}
        assert ckptio.verify(url, storage_options=opts) > 0
        assert _MANIFEST in contract_store.backend.listdir(contract_store.path("ckpt"))
        state["step"] = 4
        ckptio.save(state, url, storage_options=opts)  # overwrite=True by default
        ckptio.load(out, url, storage_options=opts)
        assert out["step"] == 4
        _ckptio_error(
            lambda: ckptio.save(state, url, storage_options=opts, overwrite=False), "save without overwrite"
        )
        with pytest.raises(CheckpointNotFoundError):
            ckptio.load(blank(), contract_store.url_of("nothing"), storage_options=opts)

        with ckptio.CheckpointManager(
            contract_store.url_of("series"), storage_options=opts, retention=ckptio.KeepLatest(1)
        ) as mgr:
            mgr.save(1, state)
            mgr.save(2, state)
            assert mgr.latest_step() == 2
            out = blank()
            mgr.load(out)
            assert torch.equal(out["w"], state["w"])
        assert mgr.steps() == [2], "retention (KeepLatest(1)) removed step 1 by close()"
        assert sorted(contract_store.backend.listdir(contract_store.root)) == ["ckpt", "series"]

    # -- atomic visibility ---------------------------------------------------------------------
    def test_open_write_invisible_until_exit(self, contract_store: ContractStore) -> None:
        """While an ``open_write`` block runs, the object is not there (``exists``, ``size``,
        ``listdir``); it appears, complete, when the block exits.

        Marker stores only: they write checkpoints in place, so a half-written object must never
        be visible. On ``rename`` stores every file is written inside a hidden staging directory
        that is renamed into place whole, which is where their atomicity lies."""
        b = contract_store.backend
        if b.commit_mode == "rename":
            pytest.skip("rename stores publish whole directories; files inside staging may be partial")
        path = contract_store.path("dir", "f.bin")
        b.makedirs(contract_store.path("dir"))
        data = _pattern(4096)
        with b.open_write(path) as f:
            f.write(data)
            assert not b.exists(path), "visible while being written"
            assert "f.bin" not in b.listdir(contract_store.path("dir")), "listed while being written"
            with pytest.raises(CheckpointNotFoundError):
                b.size(path)
        assert b.exists(path) and b.size(path) == len(data)
        assert b.listdir(contract_store.path("dir")) == ["f.bin"]
        assert b.read_bytes(path) == data

    def test_open_write_error_leaves_nothing(self, contract_store: ContractStore) -> None:
        """An exception in an ``open_write`` block propagates unchanged and leaves nothing at the
        path, also after several chunks (a multipart upload is aborted)."""
        b = contract_store.backend
        b.makedirs(contract_store.path("dir"))
        chunk = bytes(self.chunk_size)
        for name, chunks in (("small.bin", 0), ("large.bin", 3)):
            path = contract_store.path("dir", name)
            with pytest.raises(_Boom), b.open_write(path) as f:
                f.write(b"partial")
                for _ in range(chunks):
                    f.write(chunk)
                raise _Boom()
            assert not b.exists(path), f"{name}: an aborted write left an object"
            assert name not in b.listdir(contract_store.path("dir"))
            with pytest.raises(CheckpointNotFoundError):
                b.size(path)

    def test_create_bytes(self, contract_store: ContractStore) -> None:
        """``create_bytes`` creates once: a second create returns ``False`` and changes nothing;
        ``write_bytes`` replaces a file whole."""
        b = contract_store.backend
        path = contract_store.path("lock")
        assert b.create_bytes(path, b"first") is True
        assert b.create_bytes(path, b"second") is False
        assert b.read_bytes(path) == b"first" and b.size(path) == 5
        b.write_bytes(path, b"replaced, longer")
        assert b.read_bytes(path) == b"replaced, longer"
        b.write_bytes(path, b"short")
        assert b.read_bytes(path) == b"short" and b.size(path) == 5
        assert b.listdir(contract_store.root) == ["lock"], "temporary files were left behind"

    def test_create_bytes_race(self, contract_store: ContractStore) -> None:
        """With ``atomic_create``, of eight threads creating one path at once exactly one wins,
        and the file holds the winner's bytes."""
        b = contract_store.backend
        if not b.atomic_create:
            pytest.skip("atomic_create is False: create_bytes checks then writes")
        path = contract_store.path("race")
        n = 8
        barrier = threading.Barrier(n)

        def create(i: int) -> bool:
            barrier.wait(timeout=30)
            return b.create_bytes(path, f"writer-{i}".encode())

        with ThreadPoolExecutor(n) as pool:
            won = list(pool.map(create, range(n)))
        assert won.count(True) == 1, f"winners: {[i for i, w in enumerate(won) if w]}"
        assert b.read_bytes(path) == f"writer-{won.index(True)}".encode()

    # -- reads --------------------------------------------------------------------------------
    def test_ranged_reads(self, contract_store: ContractStore) -> None:
        """``size``, ``read_bytes`` with offset and length (``length=0`` is ``b""``),
        ``open_read`` seeks, and an empty file."""
        b = contract_store.backend
        data = _pattern(100_003)
        path = contract_store.put("r.bin", data)
        assert b.size(path) == len(data)
        assert b.read_bytes(path) == data
        assert b.read_bytes(path, 1000) == data[1000:]
        assert b.read_bytes(path, 1000, 5000) == data[1000:6000]
        assert b.read_bytes(path, len(data) - 7, 7) == data[-7:]
        assert b.read_bytes(path, 0, 0) == b"" and b.read_bytes(path, 500, 0) == b""
        with b.open_read(path) as f:
            f.seek(1234)
            assert f.read(10) == data[1234:1244]
            f.seek(0)
            assert f.read() == data

        empty = contract_store.put("empty.bin", b"")
        assert b.exists(empty) and b.size(empty) == 0
        assert b.read_bytes(empty) == b"" and _read_stream(b, empty) == b""
        b.read_into(empty, 0, memoryview(bytearray(0)))
        assert sorted(b.listdir(contract_store.root)) == ["empty.bin", "r.bin"]

    def test_read_into(self, contract_store: ContractStore) -> None:
        """``read_into`` fills exactly the destination slice, from any offset."""
        b = contract_store.backend
        data = _pattern(100_003)
        path = contract_store.put("r.bin", data)
        buf = bytearray(b"\xee" * 300)
        b.read_into(path, 4321, memoryview(buf)[50:250])
        assert buf[50:250] == data[4321:4521]
        assert buf[:50] == b"\xee" * 50 and buf[250:] == b"\xee" * 50, "wrote outside the slice"
        whole = bytearray(len(data))
        b.read_into(path, 0, memoryview(whole))
        assert whole == data
        tail = bytearray(3)
        b.read_into(path, len(data) - 3, memoryview(tail))
        assert tail == data[-3:]
        b.read_into(path, 10, memoryview(bytearray(0)))

    def test_read_past_end(self, contract_store: ContractStore) -> None:
        """Past the end of a file: ``read_into`` raises ``CorruptCheckpointError`` (a short file
        is an error), whether the range straddles the end or starts after it; ``read_bytes``
        returns the bytes that exist (a short read, as ``file.read`` does; the manager reads its
        ``latest`` pointer that way), and from an offset at or after the end ``b""`` or
        ``CorruptCheckpointError``, never an error that reads as a storage failure."""
        b = contract_store.backend
        data = _pattern(1000)
        path = contract_store.put("r.bin", data)
        problems: list[str] = []
        for offset, n in ((990, 20), (1000, 10), (2000, 10)):
            what = f"read_into({offset}, {n} bytes) of a {len(data)}-byte file"
            try:
                b.read_into(path, offset, memoryview(bytearray(n)))
                problems.append(f"{what} did not raise")
            except CorruptCheckpointError:
                pass
            except Exception as exc:
                problems.append(f"{what} raised {_name(exc)}, not CorruptCheckpointError")
        for offset, n, want in (
            (990, 20, data[990:]),
            (0, 64 * 1024, data),
            (1000, 10, b""),
            (2000, 10, b""),
        ):
            what = f"read_bytes({offset}, {n}) of a {len(data)}-byte file"
            try:
                got = b.read_bytes(path, offset, n)
            except CorruptCheckpointError as exc:
                if want:
                    problems.append(f"{what} raised {_name(exc)}, not a short read of {len(want)} bytes")
                continue
            except Exception as exc:
                expected = f"a short read of {len(want)} bytes" if want else "b'' or CorruptCheckpointError"
                problems.append(f"{what} raised {_name(exc)}, not {expected}")
                continue
            if got != want:
                problems.append(f"{what} returned {len(got)} bytes, not the {len(want)} that exist")
        assert not problems, "\n".join(problems)

    # -- listing --------------------------------------------------------------------------------
    def test_listing(self, contract_store: ContractStore) -> None:
        """``listdir`` (names of direct children, files and directories), ``walk_files``,
        ``is_dir`` and ``exists``, with sibling names that share a prefix (``d``, ``d2``, ``dx``;
        ``a.bin`` does not make ``a`` exist)."""
        b = contract_store.backend
        for rel in _TREE:
            contract_store.put(rel, rel.encode())
        p = contract_store.path
        problems: list[str] = []

        def expect(what: str, got: Any, want: Any) -> None:
            if got != want:
                problems.append(f"{what} = {got!r}, expected {want!r}")

        expect("listdir(root)", sorted(b.listdir(contract_store.root)), ["a.bin", "d", "d2", "dx"])
        expect("listdir(d)", sorted(b.listdir(p("d"))), ["b.bin", "e"])
        expect("listdir(d/e)", b.listdir(p("d/e")), ["c.bin"])
        expect("listdir(missing)", b.listdir(p("missing")), [])
        expect("listdir(d/missing)", b.listdir(p("d/missing")), [])
        expect("walk_files(root)", sorted(b.walk_files(contract_store.root)), sorted(_TREE))
        expect("walk_files(d)", sorted(b.walk_files(p("d"))), ["b.bin", "e/c.bin"])
        expect("walk_files(missing)", list(b.walk_files(p("missing"))), [])
        for rel, want in (("d", True), ("d/e", True), ("a.bin", False), ("dx", False), ("missing", False)):
            expect(f"is_dir({rel})", b.is_dir(p(rel)), want)
        expect("is_dir(root)", b.is_dir(contract_store.root), True)
        for rel in ("a.bin", "d", "d/e", "d/e/c.bin", "d2", "dx"):
            expect(f"exists({rel})", b.exists(p(rel)), True)
        for rel in ("missing", "a", "d/e/c", "d/b", "d/e/c.bin.x", "missing/deeper.bin"):
            expect(f"exists({rel})", b.exists(p(rel)), False)
        assert not problems, "\n".join(problems)

    # -- removal --------------------------------------------------------------------------------
    def test_remove(self, contract_store: ContractStore) -> None:
        """``remove`` deletes one file; ``recursive`` a whole tree and nothing beside it (not
        ``d2`` or ``dx`` when removing ``d``); a missing path is not an error."""
        b = contract_store.backend
        for rel in _TREE:
            contract_store.put(rel, rel.encode())
        b.remove(contract_store.path("a.bin"))
        assert not b.exists(contract_store.path("a.bin"))
        assert sorted(b.walk_files(contract_store.root)) == ["d/b.bin", "d/e/c.bin", "d2/x.bin", "dx"]
        b.remove(contract_store.path("d"), recursive=True)
        left = sorted(b.walk_files(contract_store.root))
        assert left == ["d2/x.bin", "dx"], f"remove(d, recursive=True) left {left}"
        assert sorted(b.listdir(contract_store.root)) == ["d2", "dx"]
        assert not b.exists(contract_store.path("d/e/c.bin")), "exists() of a removed file"
        assert not b.exists(contract_store.path("d")), "exists() of a removed directory (d2 and dx remain)"
        b.remove(contract_store.path("dx"), recursive=True)  # a file, removed recursively
        left = sorted(b.walk_files(contract_store.root))
        assert left == ["d2/x.bin"], f"remove(dx, recursive=True) left {left}"
        for rel in ("missing", "missing/deeper.bin", "a.bin"):
            b.remove(contract_store.path(rel))
            b.remove(contract_store.path(rel), recursive=True)
        assert b.read_bytes(contract_store.path("d2/x.bin")) == b"d2/x.bin"

    # -- errors ---------------------------------------------------------------------------------
    def test_missing_file_errors(self, contract_store: ContractStore) -> None:
        """Reading or sizing a missing file raises ``CheckpointNotFoundError`` naming it."""
        b = contract_store.backend
        contract_store.put("present.bin", b"x")

        def calls(m: str) -> dict[str, Callable[[], Any]]:
            return {
                "size": lambda: b.size(m),
                "read_bytes": lambda: b.read_bytes(m),
                "read_bytes range": lambda: b.read_bytes(m, 0, 10),
                "read_into": lambda: b.read_into(m, 0, memoryview(bytearray(4))),
                "open_read": lambda: _read_stream(b, m),
            }

        for missing in (contract_store.path("missing.bin"), contract_store.path("nodir", "missing.bin")):
            for what, call in calls(missing).items():
                exc = _ckptio_error(call, f"{what} of a missing file")
                assert isinstance(exc, CheckpointNotFoundError), (
                    f"{what} of a missing file raised {type(exc).__name__}, not CheckpointNotFoundError"
                )
                assert "missing.bin" in str(exc), f"{what}: the message does not name the file: {exc}"

    def test_errors_are_ckptio_errors(self, contract_store: ContractStore) -> None:
        """Misuse gives ckptio errors, never a driver's exception and never a silent answer:
        reading or sizing a directory as a file raises (it is no file), and writing below a
        file either works (object stores) or raises a ckptio error (file systems)."""
        b = contract_store.backend
        contract_store.put("d/f.bin", b"x")
        contract_store.put("plain.bin", b"x")
        d = contract_store.path("d")
        calls: dict[str, Callable[[], Any]] = {
            "read_bytes": lambda: b.read_bytes(d),
            "read_into": lambda: b.read_into(d, 0, memoryview(bytearray(1))),
            "open_read + read": lambda: _read_stream(b, d),
            "size": lambda: b.size(d),
        }
        problems: list[str] = []
        for what, call in calls.items():
            try:
                got = call()
                problems.append(f"{what} of a directory returned {got!r} instead of raising")
            except CheckpointError:
                pass
            except Exception as exc:
                problems.append(f"{what} of a directory raised {_name(exc)}, not a ckptio error")
        try:
            b.write_bytes(contract_store.path("plain.bin", "child.bin"), b"y")
        except CheckpointError:
            pass
        except Exception as exc:
            problems.append(f"write_bytes below a file raised {_name(exc)}, not a ckptio error")
        assert not problems, "\n".join(problems)

    # -- bounded memory -------------------------------------------------------------------------
    def _require_memory_limit(self) -> int:
        if self.memory_limit is None:
            pytest.skip("memory_limit is None")
        return self.memory_limit

    def test_bounded_memory_write(self, contract_store: ContractStore) -> None:
        """Writing ``large_size`` bytes in ``chunk_size`` writes allocates at most
        ``memory_limit`` bytes (Python allocations, ``tracemalloc``) at the peak."""
        limit = self._require_memory_limit()
        b = contract_store.backend
        size, chunk = self.large_size, self.chunk_size
        payload = _pattern(size)
        view = memoryview(payload)
        path = contract_store.path("big.bin")
        b.makedirs(contract_store.root)
        with _traced() as measure:
            with b.open_write(path) as f:
                for i in range(0, size, chunk):
                    f.write(view[i : i + chunk])
            retained, peak = measure()
        used = peak - retained if self.holds_data_in_memory else peak
        assert b.size(path) == size
        for off in (0, chunk - 3, size // 2 + 11, size - 100):
            assert b.read_bytes(path, off, 100) == payload[off : off + 100], f"bytes at {off}"
        assert used < limit, (
            f"writing {size / MiB:.0f} MiB in {chunk / MiB:g} MiB writes allocated {used / MiB:.1f} MiB "
            f"at the peak (limit {limit / MiB:.0f} MiB)"
        )

    def test_bounded_memory_read_into(self, contract_store: ContractStore) -> None:
        """``read_into`` of ``large_size`` bytes into a preallocated buffer allocates at most
        ``memory_limit`` bytes at the peak: it fills the destination, it does not build the
        range as one ``bytes`` first."""
        limit = self._require_memory_limit()
        b = contract_store.backend
        size, chunk = self.large_size, self.chunk_size
        payload = _pattern(size)
        view = memoryview(payload)
        path = contract_store.path("big.bin")
        b.makedirs(contract_store.root)
        with b.open_write(path) as f:
            for i in range(0, size, chunk):
                f.write(view[i : i + chunk])
        # from offset 1: a whole-object read could hand out a stored ``bytes`` without a copy
        out = bytearray(size - 1)
        with _traced() as measure:
            b.read_into(path, 1, memoryview(out))
            _, peak = measure()
        assert out == view[1:]
        assert peak < limit, (
            f"read_into of {size / MiB:.0f} MiB allocated {peak / MiB:.1f} MiB at the peak "
            f"(limit {limit / MiB:.0f} MiB)"
        )


def contract_tests() -> list[str]:
    """The names of the contract's tests (valid keys of ``expected_failures``)."""
    return sorted(n for n in dir(BackendContract) if n.startswith("test_"))
