"""ckptio-msc: msc://profile/path through multi-storage-client, profiles on moto (s3) and a local path."""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import ckptio
import pytest
import torch
from ckptio.checkpoint import open_backend
from ckptio.errors import CheckpointError, StorageError
from ckptio_msc import MscBackend, MscPosixBackend

from tests.e2e._ranks import run_ranks
from tests.fsspec._helpers import (
    RANK_ENV,
    THRESHOLD_CASES,
    check_plain,
    check_put_or_multipart,
    empty_plain,
    plain_state,
    save_then_load_sharded,
)

MiB = 1 << 20


@pytest.fixture
def profiles(msc_config: Any, s3_bucket: str, tmp_path: Any) -> Any:
    return msc_config(s3_bucket=s3_bucket, local_dir=tmp_path / "msc-local")


@pytest.mark.parametrize("profile", ["s3", "local"])
def test_save_load_and_manager(profiles: Any, profile: str) -> None:
    root = profiles.url(profile, "run")
    ckptio.save(plain_state(), f"{root}/one")
    out = empty_plain()
    ckptio.load(out, f"{root}/one")
    check_plain(out)
    assert ckptio.verify(f"{root}/one") > 0
    with ckptio.CheckpointManager(f"{root}/series") as mgr:
        # the commit mode is the profile's declared provider type: POSIX renames, object stores use the marker
        expected = MscPosixBackend if profile == "local" else MscBackend
        assert isinstance(mgr.backend, expected)
        assert mgr.backend.commit_mode == ("rename" if profile == "local" else "marker")
        mgr.save(1, plain_state(1))
        mgr.save(2, plain_state(2))
        assert mgr.steps() == [1, 2] and mgr.latest_step() == 2
        out = empty_plain()
        mgr.load(out, 1)
        check_plain(out, 1)


def test_config_from_storage_options(s3_server: Any, s3_bucket: str) -> None:
    """A run can carry its MSC config instead of relying on $MSC_CONFIG."""
    cfg = {
        "profiles": {
            "inline": {
                "storage_provider": {
                    "type": "s3",
                    "options": {
                        "base_path": s3_bucket,
                        "endpoint_url": s3_server.endpoint_url,
                        "region_name": "us-east-1",
                    },
                },
                "credentials_provider": {
                    "type": "S3Credentials",
                    "options": {"access_key": "testing", "secret_key": "testing"},
                },
            }
        }
    }
    ckptio.save(plain_state(), "msc://inline/x", storage_options={"msc_config": cfg})
    out = empty_plain()
    ckptio.load(out, "msc://inline/x", storage_options={"msc_config": cfg})
    check_plain(out)


def test_unknown_profile_is_a_clear_error(profiles: Any) -> None:
    with pytest.raises(StorageError, match="msc://nope"):
        ckptio.load(empty_plain(), "msc://nope/run")


@pytest.mark.slow
@pytest.mark.multirank
def test_reshard_2_to_1_and_1_to_2(profiles: Any) -> None:
    targets = [profiles.url(p, "rs") for p in ("s3", "local")]
    two = [(f"{t}/from2", {}) for t in targets]
    one = [(f"{t}/from1", {}) for t in targets]
    for url, _ in one:
        ckptio.save(plain_state(), url)
    env = dict(RANK_ENV, MSC_CONFIG=str(profiles.path))
    assert run_ranks(save_then_load_sharded, 2, args=(two, one), env=env) == [[True, True], [True, True]]
    for url, _ in two:
        out = empty_plain()
        ckptio.load(out, url)
        check_plain(out)


def test_multipart_bounded_memory_and_abort(profiles: Any, s3_server: Any, s3_bucket: str) -> None:
    _, be = open_backend(profiles.url("s3"), {"part_size": 5 * MiB, "concurrency": 2})
    payload = os.urandom(64 * MiB)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    with be.open_write("s3/big.bin") as f:
        for i in range(0, len(payload), 3 * MiB):
            f.write(memoryview(payload)[i : i + 3 * MiB])
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 5 * MiB * (3 * 2 + 3), f"peak {peak / MiB:.1f} MiB"
    out = bytearray(len(payload))
    be.read_into("s3/big.bin", 0, memoryview(out))
    assert bytes(out) == payload
    with pytest.raises(RuntimeError, match="boom"), be.open_write("s3/aborted.bin") as f:
        f.write(payload[: 12 * MiB])
        raise RuntimeError("boom")
    assert not be.exists("s3/aborted.bin")
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.slow
def test_fault_proxy_10_percent(msc_config: Any, s3_bucket: str, fault_proxy: Any) -> None:
    cfg = msc_config(s3_bucket=s3_bucket, s3_endpoint_url=fault_proxy.endpoint_url)
    fault_proxy.configure(rate=0.1, seed=3)
    opts = {"part_size": 5 * MiB, "read_chunk_size": 2 * MiB, "backoff": 0.05}
    state = {"big": torch.randn(3 * MiB), **plain_state()}
    with ckptio.CheckpointManager(cfg.url("s3", "run"), storage_options=opts) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        assert mgr.steps() == [1, 2]
        out = {"big": torch.zeros(3 * MiB), **empty_plain()}
        mgr.load(out)
    assert torch.equal(out["big"], state["big"])
    check_plain(out)
    assert fault_proxy.faults_injected > 0


def test_safetensors_on_msc(profiles: Any) -> None:
    pytest.importorskip("ckptio_safetensors")
    url = "safetensors+" + profiles.url("s3", "st")
    try:
        ckptio.save(plain_state(), url)
    except CheckpointError as exc:  # pragma: no cover - depends on the safetensors format's options
        pytest.fail(f"safetensors on msc:// failed: {exc}")
    out = empty_plain()
    ckptio.load(out, profiles.url("s3", "st"))
    check_plain(out)


@pytest.mark.parametrize(("size", "parts"), THRESHOLD_CASES)
def test_objects_up_to_the_threshold_are_one_put(
    profiles: Any, s3_server: Any, s3_bucket: str, size: int, parts: int
) -> None:
    """As in ckptio-fsspec: up to ``multipart_threshold`` (default two parts) one PutObject, above it
    a multipart upload."""
    _, be = open_backend(profiles.url("s3"), {"part_size": 5 * MiB})
    key = f"obj{size}.bin"
    check_put_or_multipart(be, f"s3/{key}", s3_server.client(), s3_bucket, key, size, parts)
