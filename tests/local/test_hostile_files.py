"""The local backend against hostile files: links, FIFOs, devices, sparse giants (issue 11).

Everything here uses real files, links and processes. Each test runs twice: with ``openat2`` (the
Linux fast path, where the kernel has it) and with the portable ``O_NOFOLLOW`` walk.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import ckptio_local.backend as local_mod
import pytest
import torch
from ckptio.backend import read_limited
from ckptio.errors import CheckpointError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from ckptio_local import LocalBackend
from ckptio_local.backend import is_temp_name

SECRET = b"TOP-SECRET-" * 100


@pytest.fixture(params=["openat2", "walk"])
def be(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBackend]:
    if request.param == "openat2" and local_mod._openat2 is None:
        pytest.skip("this kernel (or its seccomp filter) has no openat2")
    if request.param == "walk":
        monkeypatch.setattr(local_mod, "_openat2", None)
    yield LocalBackend()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A canonical root (``tmp_path`` may sit below a link on some systems)."""
    r = Path(os.path.realpath(tmp_path)) / "root"
    r.mkdir()
    return r


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    p = Path(os.path.realpath(tmp_path)) / "outside" / "secret.txt"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def _every_read(be: LocalBackend, path: str) -> list[tuple[str, BaseException | None]]:
    """Run every read entry point on ``path``; each must raise (returned for inspection)."""
    out: list[tuple[str, BaseException | None]] = []
    buf = bytearray(64)

    def open_read() -> bytes:
        with be.open_read(path) as f:
            return f.read()

    calls = {
        "read_bytes": lambda: be.read_bytes(path),
        "read_bytes_range": lambda: be.read_bytes(path, 0, 64),
        "read_into": lambda: be.read_into(path, 0, memoryview(buf)),
        "open_read": open_read,
        "size": lambda: be.size(path),
        "read_limited": lambda: read_limited(be, path, 1 << 20, "manifest"),
    }
    for name, fn in calls.items():
        try:
            got = fn()
        except BaseException as exc:  # collected and checked by the caller
            out.append((name, exc))
        else:
            out.append((name, None))
            assert SECRET[:8] not in (got if isinstance(got, bytes) else b""), name
    assert SECRET[:8] not in bytes(buf)
    return out


def _assert_all_unsafe(results: list[tuple[str, BaseException | None]], what: str) -> None:
    for name, exc in results:
        assert isinstance(exc, UnsafeCheckpointError), f"{name}: {exc!r}"
        assert what in str(exc), f"{name}: {exc}"
        assert SECRET[:8].decode() not in str(exc)


# -- links ---------------------------------------------------------------------------------------
def test_data_file_linked_to_a_secret_is_refused(be: LocalBackend, root: Path, secret: Path) -> None:
    (root / "data.bin").symlink_to(secret)
    _assert_all_unsafe(_every_read(be, str(root / "data.bin")), "symbolic link")
    assert be.exists(str(root / "data.bin")), "the link itself is an entry (so its name is never reused)"
    assert not be.is_dir(str(root / "data.bin"))


def test_file_reached_through_a_linked_directory_is_refused(
    be: LocalBackend, root: Path, secret: Path
) -> None:
    (root / "ck").symlink_to(secret.parent, target_is_directory=True)
    path = str(root / "ck" / "secret.txt")
    results = _every_read(be, path)
    _assert_all_unsafe(results, "on the way to it, is a symbolic link")
    assert str(root / "ck") in str(results[0][1])
    assert not be.exists(path), "nothing reached through a link exists"
    assert be.listdir(str(root / "ck")) == []
    assert be.listdir(str(root)) == ["ck"], "the link is still listed under its name"


def test_saved_checkpoint_with_a_data_file_linked_to_a_secret(tmp_path: Path, secret: Path) -> None:
    ck = Path(os.path.realpath(tmp_path)) / "ck"
    ckptio.save({"w": torch.zeros(len(SECRET) // 4, dtype=torch.int32)}, str(ck))
    data = [p for p in ck.iterdir() if p.name != "manifest.json" and p.is_file() and p.stat().st_size]
    assert data
    for p in data:
        p.unlink()
        p.symlink_to(secret)
    dest = {"w": torch.zeros(len(SECRET) // 4, dtype=torch.int32)}
    for verify in (True, False):
        # DCP turns errors in read_metadata into strings, so the class may be lost on the way:
        # the message still names the link
        with pytest.raises(CheckpointError, match="symbolic link"):
            ckptio.load(dest, str(ck), verify=verify)
    assert not dest["w"].any(), "no byte of the secret reached the tensor"


def test_dev_zero_is_refused_at_once(be: LocalBackend, root: Path) -> None:
    (root / "manifest.json").symlink_to("/dev/zero")
    t = time.monotonic()
    _assert_all_unsafe(_every_read(be, str(root / "manifest.json")), "symbolic link")
    # the device itself, named directly (not through a link): a character device, not a file
    _assert_all_unsafe(_every_read(be, "/dev/zero"), "character device")
    assert time.monotonic() - t < 1.0


def test_checkpoint_whose_manifest_is_dev_zero(tmp_path: Path) -> None:
    ck = Path(os.path.realpath(tmp_path)) / "ck"
    ckptio.save({"w": torch.ones(4)}, str(ck))
    (ck / "manifest.json").unlink()
    (ck / "manifest.json").symlink_to("/dev/zero")
    t = time.monotonic()
    with pytest.raises(CheckpointError):
        ckptio.load({"w": torch.zeros(4)}, str(ck))
    assert time.monotonic() - t < 2.0


# -- FIFOs, sockets, directories -------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_fifo_is_refused_without_hanging(be: LocalBackend, root: Path) -> None:
    fifo = root / "manifest.json"
    os.mkfifo(fifo)
    t = time.monotonic()
    _assert_all_unsafe(_every_read(be, str(fifo)), "FIFO")
    with pytest.raises(UnsafeCheckpointError, match="FIFO"), be.open_write(str(fifo)) as f:
        f.write(b"x")
    assert time.monotonic() - t < 1.0
    assert be.exists(str(fifo)) and not be.is_dir(str(fifo))


@pytest.mark.timeout(30)
def test_checkpoint_whose_files_are_fifos(tmp_path: Path) -> None:
    ck = Path(os.path.realpath(tmp_path)) / "ck"
    ckptio.save({"w": torch.ones(4)}, str(ck))
    for p in ck.iterdir():
        if p.is_file():
            p.unlink()
            os.mkfifo(p)
    t = time.monotonic()
    with pytest.raises(CheckpointError):
        ckptio.load({"w": torch.zeros(4)}, str(ck))
    assert time.monotonic() - t < 2.0


@pytest.mark.timeout(20)
def test_socket_and_directory_are_refused(be: LocalBackend, root: Path) -> None:
    import socket

    sock_path = root / "s"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        _assert_all_unsafe(_every_read(be, str(sock_path)), "socket")
    finally:
        s.close()
    (root / "d").mkdir()
    _assert_all_unsafe(_every_read(be, str(root / "d")), "directory")


# -- sizes ---------------------------------------------------------------------------------------------
def test_sparse_3_gib_file_is_sized_not_read(be: LocalBackend, root: Path) -> None:
    p = root / "manifest.json"
    with open(p, "wb") as f:
        f.truncate(3 << 30)
    t = time.monotonic()
    assert be.size(str(p)) == 3 << 30
    with pytest.raises(CorruptCheckpointError, match="more than the"):
        read_limited(be, str(p), 64 << 20, "manifest")
    assert be.read_bytes(str(p), (3 << 30) - 5) == b"\0" * 5, "to the end means to the fstat size"
    assert time.monotonic() - t < 1.0


def test_read_never_allocates_past_the_file(be: LocalBackend, root: Path) -> None:
    p = root / "small.bin"
    p.write_bytes(b"0123456789")
    assert be.read_bytes(str(p), 0, 1 << 40) == b"0123456789", "a hostile length is capped by fstat"
    assert be.read_bytes(str(p), 4, 1 << 40) == b"456789"
    assert be.read_bytes(str(p), 100) == b""
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        be.read_into(str(p), 5, memoryview(bytearray(10)))


# -- removal -----------------------------------------------------------------------------------------
def _other_run(tmp_path: Path) -> Path:
    step = Path(os.path.realpath(tmp_path)) / "other-run" / "step_10"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    (step / "data.bin").write_bytes(b"precious")
    return step


def test_remove_through_a_linked_step_raises_and_the_target_survives(
    be: LocalBackend, root: Path, tmp_path: Path
) -> None:
    target = _other_run(tmp_path)
    (root / "step_10").symlink_to(target, target_is_directory=True)
    for recursive in (False, True):
        with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
            be.remove(str(root / "step_10" / "manifest.json"), recursive=recursive)
    assert (target / "manifest.json").read_text() == "{}"
    assert not be.exists(str(root / "step_10" / "manifest.json")), "a linked step never looks committed"
    assert be.walk_files(str(root)).__next__() == "step_10", "walk_files lists the link, never its contents"
    assert list(be.walk_files(str(root))) == ["step_10"]


@pytest.mark.parametrize("recursive", [False, True])
def test_remove_of_a_link_removes_the_link_only(
    be: LocalBackend, root: Path, tmp_path: Path, recursive: bool
) -> None:
    target = _other_run(tmp_path)
    (root / "step_10").symlink_to(target, target_is_directory=True)
    (root / "latest").symlink_to(target / "manifest.json")
    be.remove(str(root / "step_10"), recursive=recursive)
    be.remove(str(root / "latest"), recursive=recursive)
    assert sorted(os.listdir(root)) == []
    assert sorted(os.listdir(target)) == ["data.bin", "manifest.json"]


def test_recursive_remove_does_not_follow_links_inside(be: LocalBackend, root: Path, tmp_path: Path) -> None:
    target = _other_run(tmp_path)
    step = root / "step_20"
    (step / "sub").mkdir(parents=True)
    (step / "sub" / "x.bin").write_bytes(b"x")
    (step / "sub" / "escape").symlink_to(target, target_is_directory=True)
    (step / "file-link").symlink_to(target / "data.bin")
    be.remove(str(step), recursive=True)
    assert not step.exists()
    assert (target / "data.bin").read_bytes() == b"precious"
    assert sorted(os.listdir(target)) == ["data.bin", "manifest.json"]


# -- writes ---------------------------------------------------------------------------------------
def test_writes_never_go_through_a_link(be: LocalBackend, root: Path, tmp_path: Path) -> None:
    target = _other_run(tmp_path)
    (root / "step_10").symlink_to(target, target_is_directory=True)
    inside = str(root / "step_10" / "manifest.json")
    with pytest.raises(UnsafeCheckpointError):
        be.write_bytes(inside, b"forged")
    with pytest.raises(UnsafeCheckpointError):
        be.create_bytes(str(root / "step_10" / "new"), b"forged")
    with pytest.raises(UnsafeCheckpointError), be.open_write(str(root / "step_10" / "data.bin")) as f:
        f.write(b"forged")
    with pytest.raises(UnsafeCheckpointError):
        be.makedirs(str(root / "step_10" / "sub"))
    with pytest.raises(UnsafeCheckpointError):
        be.rename(str(root / "step_10" / "data.bin"), str(root / "stolen"))
    with pytest.raises(UnsafeCheckpointError):
        be.fsync_dir(str(root / "step_10"))
    assert sorted(os.listdir(target)) == ["data.bin", "manifest.json"]
    assert (target / "data.bin").read_bytes() == b"precious"
    # write_bytes over a link at the final name replaces the link, never writes through it
    (root / "latest").symlink_to(target / "manifest.json")
    be.write_bytes(str(root / "latest"), b"10")
    assert not (root / "latest").is_symlink() and (root / "latest").read_bytes() == b"10"
    assert (target / "manifest.json").read_text() == "{}"


def test_resolve_follows_the_users_own_root_link(be: LocalBackend, tmp_path: Path) -> None:
    base = Path(os.path.realpath(tmp_path))
    (base / "disk2" / "runs").mkdir(parents=True)
    (base / "run").symlink_to(base / "disk2" / "runs", target_is_directory=True)
    resolved = be.resolve(str(base / "run"))
    assert resolved == str(base / "disk2" / "runs")
    assert be.resolve(str(base / "run" / "not-yet" / "ck")) == str(base / "disk2" / "runs" / "not-yet" / "ck")
    be.write_bytes(be.join(resolved, "step_1", "manifest.json"), b"{}")
    assert (base / "run").is_symlink(), "the user's link is kept"
    assert (base / "disk2" / "runs" / "step_1" / "manifest.json").read_bytes() == b"{}"
    with pytest.raises(UnsafeCheckpointError):  # unresolved, the link is refused like any other
        be.read_bytes(str(base / "run" / "step_1" / "manifest.json"))


def test_save_through_a_linked_root_keeps_the_link(tmp_path: Path) -> None:
    base = Path(os.path.realpath(tmp_path))
    (base / "disk2").mkdir()
    (base / "ck").symlink_to(base / "disk2", target_is_directory=True)
    ckptio.save({"w": torch.ones(4)}, str(base / "ck"), overwrite=True)
    assert (base / "ck").is_symlink(), "finding 16: saving replaced the user's link by a directory"
    assert (base / "disk2" / "manifest.json").is_file()
    dest = {"w": torch.zeros(4)}
    ckptio.load(dest, str(base / "ck"))
    assert torch.equal(dest["w"], torch.ones(4))


# -- create_bytes, temporary files ----------------------------------------------------------------
def test_create_bytes_racing_threads_one_winner(be: LocalBackend, root: Path) -> None:
    assert LocalBackend.atomic_create
    for round_ in range(30):
        path = str(root / f"manifest-{round_}.json")
        barrier = threading.Barrier(8)
        results: dict[int, bool] = {}

        def go(
            i: int, path: str = path, barrier: threading.Barrier = barrier, results: dict[int, bool] = results
        ) -> None:
            barrier.wait()
            results[i] = be.create_bytes(path, f"writer {i}".encode() * 1000)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, ok in results.items() if ok]
        assert len(winners) == 1, results
        assert Path(path).read_bytes() == f"writer {winners[0]}".encode() * 1000
    assert not [n for n in os.listdir(root) if is_temp_name(n)], "no temporary file left"


def _race(path: str, barrier: Any, me: str, results: Any) -> None:
    barrier.wait()
    results.put((me, LocalBackend().create_bytes(path, me.encode() * 4096)))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
def test_create_bytes_racing_processes_one_winner(root: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # fork: no second torch import per process
    for round_ in range(5):
        path = str(root / f"manifest-{round_}.json")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(path, barrier, f"p{i}", results)) for i in range(4)]
        for p in procs:
            p.start()
        outs = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        winners = [me for me, ok in outs.items() if ok]
        assert len(winners) == 1, outs
        assert Path(path).read_bytes() == winners[0].encode() * 4096


def test_create_bytes_does_not_replace(be: LocalBackend, root: Path) -> None:
    p = root / "x"
    assert be.create_bytes(str(p), b"first")
    assert not be.create_bytes(str(p), b"second")
    assert p.read_bytes() == b"first"
    (root / "dangling").symlink_to(root / "nowhere")
    assert not be.create_bytes(str(root / "dangling"), b"x"), "a (dangling) link is an entry: not created"
    assert not (root / "nowhere").exists()


def test_temp_names() -> None:
    assert is_temp_name(".latest.0123456789abcdef.tmp")
    assert is_temp_name(".manifest.json.deadbeef.tmp")
    assert not is_temp_name("latest") and not is_temp_name("step_10") and not is_temp_name(".x.tmp")


def _write_past_the_limit(path: str, results: Any) -> None:
    """In a forked child: files may not grow past 4 KiB, so a larger write fails (EFBIG), as on a
    full disk."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    be = LocalBackend()
    for fn in (be.write_bytes, be.create_bytes):
        try:
            fn(path, b"x" * 100000)
        except StorageError as exc:
            results.put(f"StorageError: {exc}")
        else:
            results.put("no error")


def test_failed_small_write_leaves_no_temporary_file(root: Path) -> None:
    (root / "latest").write_bytes(b"10")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_write_past_the_limit, args=(str(root / "latest"), results))
    proc.start()
    outs = [results.get(timeout=60) for _ in range(2)]
    proc.join(60)
    assert proc.exitcode == 0
    assert all(o.startswith("StorageError") for o in outs), outs
    assert sorted(os.listdir(root)) == ["latest"], "no temporary file left behind"
    assert (root / "latest").read_bytes() == b"10", "the old content is intact"


def test_embedded_null_byte_is_refused(be: LocalBackend, root: Path) -> None:
    (root / "a").write_bytes(b"not this one")
    with pytest.raises(StorageError):
        be.read_bytes(str(root / "a") + "\0/../b")
    assert not be.exists(str(root / "a") + "\0")


def test_non_directory_on_the_way_is_a_storage_error(be: LocalBackend, root: Path) -> None:
    (root / "f").write_bytes(b"x")
    with pytest.raises(StorageError) as info:
        be.read_bytes(str(root / "f" / "g"))
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert not be.exists(str(root / "f" / "g"))
    be.remove(str(root / "f" / "g"))  # nothing there: not an error
