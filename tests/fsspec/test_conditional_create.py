"""``create_bytes`` on object stores: one winner among racing writers (S3 ``If-None-Match: *``).

Real servers only: moto for ``s3://`` and MSC ``s3`` profiles (moto 5 honours ``If-None-Match``),
a fault proxy that loses the answer of a put the server applied, and a real directory for MSC POSIX.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ckptio.backend import Backend
from ckptio.checkpoint import open_backend
from ckptio.errors import UnsafeCheckpointError
from ckptio_fsspec import FsspecBackend, MemoryBackend, S3Backend
from ckptio_msc import MscPosixBackend, MscS3Backend


def _race(be: Backend, path: str, writers: int = 8) -> dict[int, bool]:
    """``writers`` threads call ``create_bytes(path)`` at once; returns who got ``True``."""
    barrier = threading.Barrier(writers)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = be.create_bytes(path, f"writer {i} {uuid.uuid4().hex}".encode())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def _check_one_winner(be: Backend, make_path: Callable[[int], str], rounds: int = 8) -> None:
    assert be.atomic_create
    for r in range(rounds):
        path = make_path(r)
        results = _race(be, path)
        winners = [i for i, ok in results.items() if ok]
        assert len(winners) == 1, results
        assert be.read_bytes(path).startswith(f"writer {winners[0]} ".encode())


def test_s3_racing_creates_one_winner(s3_server: Any, s3_bucket: str) -> None:
    _, be = open_backend(f"s3://{s3_bucket}/run", s3_server.storage_options())
    assert isinstance(be, S3Backend) and be.commit_mode == "marker"
    _check_one_winner(be, lambda r: f"{s3_bucket}/run/step_{r}/manifest.json")


def test_s3_create_never_replaces(s3_server: Any, s3_bucket: str) -> None:
    _, be = open_backend(f"s3://{s3_bucket}", s3_server.storage_options())
    path = f"{s3_bucket}/lock"
    assert be.create_bytes(path, b"first")
    assert not be.create_bytes(path, b"second")
    assert not be.create_bytes(path, b"firsT"), "same size, other bytes: not ours"
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="lock")["Body"].read() == b"first"
    # an object already holding exactly these bytes is the answer of our own retried put
    assert be.create_bytes(path, b"first")


def test_s3_put_applied_but_answer_lost(s3_server: Any, s3_bucket: str, fault_proxy: Any) -> None:
    """The server applies the put, the answer is cut: the retry meets a 412 on its own object."""
    opts = dict(s3_server.storage_options(endpoint_url=fault_proxy.endpoint_url), backoff=0.01)
    _, be = open_backend(f"s3://{s3_bucket}", opts)
    fault_proxy.configure(modes=["drop_response"], methods=["PUT"], fail_next=1)
    assert be.create_bytes(f"{s3_bucket}/manifest.json", b"ours, token 42")
    assert fault_proxy.stats()["faults"] >= 1
    fault_proxy.configure(modes=["drop_response"], methods=["PUT"], fail_next=1)
    assert not be.create_bytes(f"{s3_bucket}/manifest.json", b"theirs, token 43")
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="manifest.json")["Body"].read()
    assert body == b"ours, token 42"


def test_memory_racing_creates_one_winner() -> None:
    root = f"mem-{uuid.uuid4().hex[:8]}"
    _, be = open_backend(f"memory://{root}")
    assert isinstance(be, MemoryBackend)
    _check_one_winner(be, lambda r: f"{root}/step_{r}/manifest.json", rounds=4)


def test_other_protocols_do_not_claim_atomicity() -> None:
    assert not FsspecBackend.atomic_create, "gs/az/others check then write"


def test_msc_s3_racing_creates_one_winner(msc_config: Any, s3_bucket: str, tmp_path: Path) -> None:
    cfg = msc_config(s3_bucket=s3_bucket)
    _, be = open_backend(cfg.url("s3", "run"))
    assert isinstance(be, MscS3Backend)
    _check_one_winner(be, lambda r: f"s3/run/step_{r}/manifest.json", rounds=4)
    assert not be.create_bytes("s3/run/step_0/manifest.json", b"late")


def test_msc_posix_create_and_links(msc_config: Any, tmp_path: Path) -> None:
    base = Path(os.path.realpath(tmp_path))
    (base / "disk2").mkdir()
    (base / "data").symlink_to(base / "disk2", target_is_directory=True)  # the profile's base is a link
    cfg = msc_config(local_dir=base / "data")
    _, be = open_backend(cfg.url("local", "run"))
    assert isinstance(be, MscPosixBackend)
    _check_one_winner(be, lambda r: f"local/run/step_{r}/manifest.json", rounds=3)
    assert (base / "disk2" / "run" / "step_0" / "manifest.json").is_file()
    assert (base / "data").is_symlink()
    # a link the user made below the base is followed by resolve() only
    (base / "disk2" / "alias").symlink_to(base / "disk2" / "run", target_is_directory=True)
    assert be.resolve("local/alias") == "local/run"
    with pytest.raises(UnsafeCheckpointError):
        be.read_bytes("local/alias/step_0/manifest.json")
