"""Smoke tests: every server fixture works with the real client libraries."""

from __future__ import annotations

import http.client
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from .fault_proxy import FaultProxy
from .fixtures import AzureServer, GCSServer, MscConfig, S3Server

MiB = 1024 * 1024


def _payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) % 251 for i in range(256)) * (n // 256) + b"x" * (n % 256)


# ------------------------------------------------------------------------------------------------ S3


def test_s3_boto3_roundtrip(s3_server: S3Server, s3_bucket: str) -> None:
    c = s3_server.client()
    c.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert c.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["a/b.txt"]
    c.delete_object(Bucket=s3_bucket, Key="a/b.txt")
    assert c.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.rss_bytes() > 0


def test_s3_s3fs_roundtrip(s3_server: S3Server, s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/small.txt", b"hello s3fs")
    assert fs.cat(f"{s3_bucket}/small.txt") == b"hello s3fs"
    data = _payload(12 * MiB)
    with fs.open(f"{s3_bucket}/big.bin", "wb", block_size=5 * MiB) as f:  # multipart: 3 parts
        f.write(data)
    assert fs.info(f"{s3_bucket}/big.bin")["size"] == len(data)
    assert fs.cat(f"{s3_bucket}/big.bin") == data
    assert sorted(fs.ls(s3_bucket)) == sorted([f"{s3_bucket}/big.bin", f"{s3_bucket}/small.txt"])
    fs.rm(f"{s3_bucket}/big.bin")
    assert not fs.exists(f"{s3_bucket}/big.bin")


def test_s3_env_for_default_chain(s3_env: S3Server, s3_bucket: str) -> None:
    import boto3

    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_env.endpoint_url
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="k", Body=b"v")  # endpoint from the environment
    assert s3_env.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"


def test_fresh_s3_server_stop_and_restart(fresh_s3_server: S3Server) -> None:
    import botocore.config
    import botocore.exceptions

    bucket = fresh_s3_server.make_bucket()
    cfg = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2)
    c = fresh_s3_server.client(config=cfg)
    c.put_object(Bucket=bucket, Key="k", Body=b"v")
    fresh_s3_server.stop()
    assert not fresh_s3_server.running()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        c.get_object(Bucket=bucket, Key="k")
    fresh_s3_server.restart()  # same port, empty store
    with pytest.raises(c.exceptions.NoSuchBucket):
        c.get_object(Bucket=bucket, Key="k")


# ---------------------------------------------------------------------------------------- fault proxy


def test_fault_proxy_forwards_chunked_and_keepalive(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    """Raw HTTP/1.1 through the proxy: a chunked PUT and several requests on one kept-alive connection."""
    import boto3

    signer = boto3.client(
        "s3",
        endpoint_url=fault_proxy.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )

    def presigned(method: str, key: str) -> str:
        url = signer.generate_presigned_url(method, Params={"Bucket": s3_bucket, "Key": key}, ExpiresIn=600)
        parts = urllib.parse.urlsplit(url)
        return parts.path + "?" + parts.query

    u = urllib.parse.urlsplit(fault_proxy.endpoint_url)
    assert u.hostname is not None
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = _payload(3 * MiB + 17)
    chunks = iter([body[: MiB + 5], body[MiB + 5 :]])
    conn.request("PUT", presigned("put_object", "chunked.bin"), body=chunks, encode_chunked=True)
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    for _ in range(3):  # same socket each time
        conn.request("GET", presigned("get_object", "chunked.bin"))
        r = conn.getresponse()
        assert r.status == 200 and r.read() == body
        conn.request("HEAD", presigned("head_object", "chunked.bin"))
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and int(r.getheader("Content-Length") or 0) == len(body)
    conn.close()
    stats = fault_proxy.stats()
    assert stats["connections"] >= 1 and stats["forwarded"] == 7 and stats["faults"] == 0


def test_fault_proxy_each_mode_with_boto3(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3",
        endpoint_url=fault_proxy.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=botocore.config.Config(retries={"max_attempts": 5, "mode": "standard"}),
    )
    body = _payload(2 * MiB + 3)  # > 1 MiB: botocore sends "Expect: 100-continue"
    for i, mode in enumerate(["503", "drop_request", "drop_response"]):
        fault_proxy.configure(fail_next=1, modes=[mode])
        client.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=body)  # retried by botocore
        fault_proxy.configure(fail_next=1, modes=[mode])
        if mode == "drop_response":
            # The cut falls inside the GET body, after botocore has returned: the caller must retry.
            resp = client.get_object(Bucket=s3_bucket, Key=f"k{i}")
            with pytest.raises(botocore.exceptions.ResponseStreamingError):
                resp["Body"].read()
        assert client.get_object(Bucket=s3_bucket, Key=f"k{i}")["Body"].read() == body
    stats = fault_proxy.stats()
    assert stats["fault_503"] == 2 and stats["fault_drop_request"] == 2 and stats["fault_drop_response"] == 2
    assert fault_proxy.faults_injected == 6


def test_fault_proxy_s3fs_retries_succeed(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    import s3fs

    fault_proxy.configure(seed=1234)
    fault_proxy.failure_rate = 0.1
    assert fault_proxy.failure_rate == 0.1
    opts = s3_server.storage_options(
        endpoint_url=fault_proxy.endpoint_url,
        config_kwargs={"retries": {"max_attempts": 10, "mode": "standard"}},
    )
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    blobs = {f"{s3_bucket}/obj{i:02d}": _payload(64 * 1024 + i, seed=i) for i in range(30)}
    for path, data in blobs.items():
        fs.pipe_file(path, data)
    for path, data in blobs.items():
        assert fs.cat_file(path) == data
    assert sorted(fs.ls(s3_bucket, refresh=True)) == sorted(blobs)
    fault_proxy.failure_rate = 0.0
    stats = fault_proxy.stats()
    assert stats["faults"] > 0, stats
    assert stats["forwarded"] >= len(blobs) * 2


# ----------------------------------------------------------------------------------------------- GCS


def test_gcs_gcsfs_roundtrip(gcs_server: GCSServer, gcs_bucket: str) -> None:
    import gcsfs

    fs = gcsfs.GCSFileSystem(**gcs_server.storage_options(), skip_instance_cache=True)
    assert gcs_bucket in [b.rstrip("/") for b in fs.ls("")]
    # gcsfs quirk: the cached root listing names buckets "bkt/", which later makes info("bkt/obj") raise
    # FileNotFoundError(bkt) from the dircache. Drop the cache after listing buckets.
    fs.invalidate_cache()
    fs.pipe(f"{gcs_bucket}/a/hello.txt", b"hello gcs")
    assert fs.cat(f"{gcs_bucket}/a/hello.txt") == b"hello gcs"
    data = _payload(32 * MiB)
    with fs.open(f"{gcs_bucket}/big.bin", "wb") as f:  # resumable upload in several chunks
        f.write(data)
    assert fs.info(f"{gcs_bucket}/big.bin")["size"] == len(data)
    assert fs.cat_file(f"{gcs_bucket}/big.bin", start=MiB, end=2 * MiB) == data[MiB : 2 * MiB]
    assert fs.cat(f"{gcs_bucket}/big.bin") == data
    assert sorted(fs.ls(gcs_bucket)) == sorted([f"{gcs_bucket}/a", f"{gcs_bucket}/big.bin"])
    fs.rm(f"{gcs_bucket}/big.bin")
    fs.invalidate_cache()
    assert not fs.exists(f"{gcs_bucket}/big.bin")


# --------------------------------------------------------------------------------------------- Azure


def test_azure_adlfs_roundtrip(azure_server: AzureServer, azure_container: str) -> None:
    import adlfs

    fs = adlfs.AzureBlobFileSystem(**azure_server.storage_options(), skip_instance_cache=True)
    fs.pipe(f"{azure_container}/a/hello.txt", b"hello az")
    assert fs.cat(f"{azure_container}/a/hello.txt") == b"hello az"
    data = _payload(6 * MiB)
    with fs.open(f"{azure_container}/big.bin", "wb") as f:
        f.write(data)
    assert fs.cat(f"{azure_container}/big.bin") == data
    fs.rm(f"{azure_container}/big.bin")
    fs.invalidate_cache()
    assert not fs.exists(f"{azure_container}/big.bin")


# ----------------------------------------------------------------------------------------------- MSC


def test_msc_s3_and_local_profiles(
    msc_config: Callable[..., MscConfig], s3_bucket: str, tmp_path: Path
) -> None:
    import multistorageclient as msc

    cfg = msc_config(s3_bucket=s3_bucket, local_dir=tmp_path / "local")
    assert os.environ["MSC_CONFIG"] == str(cfg.path)
    for profile in ("s3", "local"):
        url = cfg.url(profile, "smoke", "a.txt")
        msc.write(url, b"hello " + profile.encode())
        with msc.open(url, "rb") as f:
            assert f.read() == b"hello " + profile.encode()
        with msc.open(cfg.url(profile, "smoke", "b.bin"), "wb") as f:
            f.write(b"x" * 1000)
        assert msc.info(cfg.url(profile, "smoke", "b.bin")).content_length == 1000
        names = sorted(os.path.basename(m.key) for m in msc.list(cfg.url(profile, "smoke/")))
        assert names == ["a.txt", "b.bin"], names
        msc.delete(url)
    assert (tmp_path / "local" / "smoke" / "b.bin").stat().st_size == 1000


def test_msc_gcs_and_azure_profiles(
    msc_config: Callable[..., MscConfig], gcs_bucket: str, azure_container: str
) -> None:
    import multistorageclient as msc

    cfg = msc_config(gcs_bucket=gcs_bucket, azure_container=azure_container)
    data = _payload(3 * MiB)
    for profile in ("gcs", "azure"):
        url = cfg.url(profile, "smoke", "obj.bin")
        msc.write(url, data)
        with msc.open(url, "rb") as f:
            assert f.read() == data
        with msc.open(cfg.url(profile, "smoke", "f.bin"), "wb") as f:
            f.write(data)
        with msc.open(cfg.url(profile, "smoke", "f.bin"), "rb") as f:
            assert f.read() == data
        assert sorted(os.path.basename(m.key) for m in msc.list(cfg.url(profile, "smoke/"))) == [
            "f.bin",
            "obj.bin",
        ]


def test_msc_s3_through_fault_proxy(
    msc_config: Callable[..., MscConfig], s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    import multistorageclient as msc

    cfg = msc_config(
        s3_bucket=s3_bucket,
        s3_endpoint_url=fault_proxy.endpoint_url,
        s3_options={"retries": {"max_attempts": 10, "mode": "standard"}},
        retry={"attempts": 5, "delay": 0.05, "backoff_multiplier": 1.0},
    )
    blobs = {cfg.url("s3", f"obj{i:02d}"): _payload(32 * 1024 + i, seed=i) for i in range(3)}
    # Deterministic faults: botocore's jittered exponential backoff makes random high-rate runs slow.
    for n, (url, data) in enumerate(blobs.items()):
        fault_proxy.fail_next(1, modes=["503", "drop_request", "drop_response"][n % 3 : n % 3 + 1])
        msc.write(url, data)
    for n, (url, data) in enumerate(blobs.items()):
        fault_proxy.fail_next(1, modes=["503", "drop_request"][n % 2 : n % 2 + 1])
        with msc.open(url, "rb") as f:
            assert f.read() == data
    assert fault_proxy.faults_injected == 2 * len(blobs)
