"""ckptio-fsspec against real servers: moto (s3://), fake-gcs-server (gs://), Azurite (az://), memory://."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from typing import Any

import ckptio
import pytest
import torch
from ckptio.checkpoint import open_backend
from ckptio.errors import CheckpointError, CheckpointNotFoundError, StorageAuthError
from ckptio.plugins import backend_factory, register_backend, unregister
from ckptio_fsspec import FsspecBackend

from tests.e2e._ranks import run_ranks

from ._helpers import (
    RANK_ENV,
    THRESHOLD_CASES,
    check_plain,
    check_put_or_multipart,
    empty_plain,
    plain_state,
    save_then_load_sharded,
)

MiB = 1 << 20


def _target(request: pytest.FixtureRequest, kind: str) -> tuple[str, dict[str, Any]]:
    """A fresh root URL on store ``kind`` and its storage options."""
    if kind == "memory":
        import uuid

        return f"memory://mem-{uuid.uuid4().hex[:8]}/run", {}
    if kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        return f"s3://{s3.make_bucket()}/run", s3.storage_options()
    if kind == "gs":
        gcs = request.getfixturevalue("gcs_server")
        return f"gs://{gcs.make_bucket()}/run", gcs.storage_options()
    if kind == "az":
        az = request.getfixturevalue("azure_server")
        return f"az://{az.make_container()}/run", az.storage_options()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["memory", "s3", "gs", "az"])
def test_save_load_and_manager(request: pytest.FixtureRequest, kind: str) -> None:
    root, opts = _target(request, kind)
    ckptio.save(plain_state(), f"{root}/one", storage_options=opts)
    out = empty_plain()
    ckptio.load(out, f"{root}/one", storage_options=opts)
    check_plain(out)
    assert ckptio.verify(f"{root}/one", storage_options=opts) > 0

    with ckptio.CheckpointManager(f"{root}/series", storage_options=opts) as mgr:
        assert isinstance(mgr.backend, FsspecBackend) and mgr.backend.commit_mode == "marker"
        mgr.save(1, plain_state(1))
        mgr.save(2, plain_state(2))
        assert mgr.steps() == [1, 2] and mgr.latest_step() == 2
        out = empty_plain()
        mgr.load(out)
        check_plain(out, 2)


@pytest.mark.slow
@pytest.mark.multirank
def test_reshard_2_to_1_and_1_to_2(request: pytest.FixtureRequest) -> None:
    """DTensor state saved by 2 ranks loads on 1; a 1-rank save loads into 2 shards (s3, gs, az)."""
    kinds = ["s3", "gs", "az"]
    roots = [_target(request, k) for k in kinds]
    two = [(f"{r}/from2", o) for r, o in roots]
    one = [(f"{r}/from1", o) for r, o in roots]
    for url, opts in one:
        ckptio.save(plain_state(), url, storage_options=opts)
    results = run_ranks(save_then_load_sharded, 2, args=(two, one), env=RANK_ENV)
    assert results == [[True] * 3, [True] * 3]
    for url, opts in two:
        out = empty_plain()
        ckptio.load(out, url, storage_options=opts)
        check_plain(out)


def test_safetensors_on_s3(s3_server: Any, s3_bucket: str) -> None:
    pytest.importorskip("ckptio_safetensors")
    opts = s3_server.storage_options()
    url = f"safetensors+s3://{s3_bucket}/st"
    ckptio.save(plain_state(), url, storage_options=opts)
    assert ckptio.manifest(url, storage_options=opts).format == "safetensors"
    out = empty_plain()
    ckptio.load(out, f"s3://{s3_bucket}/st", storage_options=opts)
    check_plain(out)


def test_multipart_parallel_bounded_memory_and_abort(s3_server: Any, s3_bucket: str) -> None:
    """A 64 MiB stream becomes 13 parts of 5 MiB; Python-side memory stays bounded by the part size and
    concurrency (the filling buffer, each part in flight and botocore's copies of it), not by the file size;
    a body that raises leaves neither an object nor a pending multipart upload."""
    _, be = open_backend(
        f"s3://{s3_bucket}", dict(s3_server.storage_options(), part_size=5 * MiB, concurrency=2)
    )
    payload = os.urandom(64 * MiB)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    with be.open_write(f"{s3_bucket}/big.bin") as f:
        for i in range(0, len(payload), 3 * MiB):  # writes that straddle part boundaries
            f.write(memoryview(payload)[i : i + 3 * MiB])
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 5 * MiB * (3 * 2 + 3), f"peak {peak / MiB:.1f} MiB"
    assert be.size(f"{s3_bucket}/big.bin") == len(payload)
    out = bytearray(len(payload))
    be.read_into(f"{s3_bucket}/big.bin", 0, memoryview(out))
    assert bytes(out) == payload
    assert be.read_bytes(f"{s3_bucket}/big.bin", 7 * MiB + 3, 11) == payload[7 * MiB + 3 : 7 * MiB + 14]

    with pytest.raises(RuntimeError, match="boom"), be.open_write(f"{s3_bucket}/aborted.bin") as f:
        f.write(payload[: 12 * MiB])
        raise RuntimeError("boom")
    assert not be.exists(f"{s3_bucket}/aborted.bin")
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_no_local_files(
    s3_server: Any, s3_bucket: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint on s3:// is complete there: nothing is written to the working dir or TMPDIR."""
    import tempfile

    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    opts = dict(s3_server.storage_options(), part_size=5 * MiB)
    state = {"big": torch.randn(3 * MiB), **plain_state()}  # 12 MiB: a multipart upload
    with ckptio.CheckpointManager(f"s3://{s3_bucket}/run", storage_options=opts) as mgr:
        mgr.save(5, state)
        out = {"big": torch.zeros(3 * MiB), **empty_plain()}
        mgr.load(out)
    assert torch.equal(out["big"], state["big"])
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []


@pytest.mark.slow
def test_fault_proxy_10_percent(s3_server: Any, s3_bucket: str, fault_proxy: Any) -> None:
    """503 SlowDown and dropped connections on 10% of requests: save and load still succeed, bit-exact."""
    opts = dict(
        s3_server.storage_options(endpoint_url=fault_proxy.endpoint_url),
        part_size=5 * MiB,
        read_chunk_size=2 * MiB,
    )
    opts["backoff"] = 0.05
    fault_proxy.configure(rate=0.1, seed=7)
    state = {"big": torch.randn(3 * MiB), **plain_state()}
    with ckptio.CheckpointManager(f"s3://{s3_bucket}/run", storage_options=opts) as mgr:
        for step in (1, 2):
            mgr.save(step, state)
        assert mgr.steps() == [1, 2]
        out = {"big": torch.zeros(3 * MiB), **empty_plain()}
        mgr.load(out)
    assert torch.equal(out["big"], state["big"])
    check_plain(out)
    assert fault_proxy.faults_injected > 0


class _DiesMidUpload(FsspecBackend):
    """Calls ``on_first_part`` once the first part of a data file has been handed over."""

    on_first_part: Any = None

    def open_write(self, path: str) -> Any:
        inner = super().open_write(path)
        hook = type(self).on_first_part
        if hook is None or not path.endswith(".bin"):
            return inner

        class Wrap:
            def __enter__(self_w) -> Any:
                f = inner.__enter__()
                orig = f.write

                def write(b: Any) -> int:
                    n = orig(b)
                    if type(self).on_first_part is not None and getattr(f, "next_part", 1) > 1:
                        type(self).on_first_part = None
                        hook()
                    return n

                f.write = write
                return f

            def __exit__(self_w, *exc: Any) -> Any:
                return inner.__exit__(*exc)

        return Wrap()


@pytest.mark.slow
def test_endpoint_dies_mid_save(s3_server: Any, s3_bucket: str, fault_proxy_factory: Any) -> None:
    """The S3 endpoint goes away in the middle of step 2's upload: a ckptio error, step 1 still
    loads, and step 2 stays invisible to steps()/latest_step()."""
    proxy = fault_proxy_factory(s3_server.endpoint_url)
    opts = dict(
        s3_server.storage_options(endpoint_url=proxy.endpoint_url),
        part_size=5 * MiB,
        attempts=3,
        backoff=0.05,
    )
    state = {"big": torch.randn(3 * MiB), **plain_state()}
    register_backend("s3", _DiesMidUpload)
    try:
        with ckptio.CheckpointManager(f"s3://{s3_bucket}/run", storage_options=opts) as mgr:
            mgr.save(1, state)
            _DiesMidUpload.on_first_part = proxy.stop  # the "server" vanishes mid-upload
            with pytest.raises(CheckpointError):
                mgr.save(2, {**state, "step": 8})
    except CheckpointError:
        pass  # close() may re-raise the failed save; it is a ckptio error either way
    finally:
        _DiesMidUpload.on_first_part = None
        unregister("backend", "s3")
        from ckptio.plugins import reload_plugins

        reload_plugins()
    # the same data, reached through a new endpoint
    back = fault_proxy_factory(s3_server.endpoint_url)
    opts2 = dict(s3_server.storage_options(endpoint_url=back.endpoint_url))
    with ckptio.CheckpointManager(f"s3://{s3_bucket}/run", storage_options=opts2) as mgr:
        assert mgr.steps() == [1] and mgr.latest_step() == 1
        out = {"big": torch.zeros(3 * MiB), **empty_plain()}
        mgr.load(out)
    assert torch.equal(out["big"], state["big"])


@pytest.mark.slow
def test_moto_killed_mid_save_is_a_ckptio_error(fresh_s3_server: Any) -> None:
    bucket = fresh_s3_server.make_bucket()
    opts = dict(fresh_s3_server.storage_options(), part_size=5 * MiB, attempts=2, backoff=0.05)
    register_backend("s3", _DiesMidUpload)
    _DiesMidUpload.on_first_part = fresh_s3_server.kill
    try:
        with pytest.raises(CheckpointError) as info:
            ckptio.save({"big": torch.randn(3 * MiB)}, f"s3://{bucket}/run", storage_options=opts)
        assert f"s3://{bucket}" in str(info.value)
    finally:
        _DiesMidUpload.on_first_part = None
        unregister("backend", "s3")
        from ckptio.plugins import reload_plugins

        reload_plugins()


def test_bad_credentials(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A moto that checks signatures refuses unknown keys: StorageAuthError, secret not in the message."""
    from tests.servers.fixtures import S3Server

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # moto: authenticate every request
    server = S3Server(log_dir=tmp_path)
    try:
        secret = "sUpErSeCrEt-do-not-print-1234"
        opts = {
            "key": "AKIANOTAREALKEY00000",
            "secret": secret,
            "client_kwargs": {"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
            "attempts": 2,
        }
        with pytest.raises(StorageAuthError) as info:
            ckptio.save(plain_state(), "s3://some-bucket/run", storage_options=opts)
        assert secret not in str(info.value) and "s3://some-bucket" in str(info.value)
        with pytest.raises(StorageAuthError) as info2:
            ckptio.load(empty_plain(), "s3://some-bucket/run", storage_options=opts)
        assert secret not in str(info2.value)
    finally:
        server.stop()


def test_missing_bucket_and_checkpoint(s3_server: Any, s3_bucket: str) -> None:
    opts = s3_server.storage_options()
    with pytest.raises(CheckpointNotFoundError):
        ckptio.load(empty_plain(), f"s3://{s3_bucket}/nothing-here", storage_options=opts)
    with pytest.raises(CheckpointError):
        ckptio.load(empty_plain(), "s3://no-such-bucket-ckptio/run", storage_options=opts)


def test_registration() -> None:
    for scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "http", "hf"):
        assert issubclass(backend_factory(scheme), FsspecBackend), scheme  # type: ignore[arg-type]
    assert backend_factory("file") is not FsspecBackend
    assert backend_factory("msc") is not FsspecBackend  # ckptio-msc outranks the catch-all


def test_missing_driver_names_the_package() -> None:
    code = (
        "import sys; sys.modules['adlfs'] = None\n"
        "from ckptio.checkpoint import open_backend\n"
        "from ckptio.errors import PluginError\n"
        "try:\n    open_backend('az://c/x')\nexcept PluginError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout and "pip install" in out.stdout and "adlfs" in out.stdout, (
        out.stdout + out.stderr
    )


@pytest.mark.parametrize(("size", "parts"), THRESHOLD_CASES)
def test_objects_up_to_the_threshold_are_one_put(
    s3_server: Any, s3_bucket: str, size: int, parts: int
) -> None:
    """Objects of at most ``multipart_threshold`` (default two parts) are one PutObject; larger ones are
    multipart uploads."""
    _, be = open_backend(f"s3://{s3_bucket}", dict(s3_server.storage_options(), part_size=5 * MiB))
    key = f"obj{size}.bin"
    check_put_or_multipart(be, f"{s3_bucket}/{key}", s3_server.client(), s3_bucket, key, size, parts)
