"""ckptio-msc as an adapter over ckptio.objectstore: declared options, options passed on to the
profile's storage provider, and secrets scrubbed from errors."""

from __future__ import annotations

from typing import Any

import ckptio
import pytest
from ckptio.checkpoint import open_backend
from ckptio.errors import CheckpointError, OptionError, StorageAuthError, StorageError
from ckptio_msc import MscS3Backend

from tests.fsspec._helpers import check_plain, empty_plain, plain_state

MiB = 1 << 20


def _config(bucket: str, endpoint_url: str, secret_key: str = "testing") -> dict[str, Any]:
    profile = {
        "storage_provider": {
            "type": "s3",
            "options": {"base_path": bucket, "endpoint_url": endpoint_url, "region_name": "us-east-1"},
        },
        "credentials_provider": {
            "type": "S3Credentials",
            "options": {"access_key": "testing", "secret_key": secret_key},
        },
    }
    return {"profiles": {"inline": profile}}


@pytest.mark.parametrize(("typo", "meant"), [("part_sise", "part_size"), ("msc_confg", "msc_config")])
def test_a_misspelt_option_names_the_right_one(s3_server: Any, s3_bucket: str, typo: str, meant: str) -> None:
    opts = {"msc_config": _config(s3_bucket, s3_server.endpoint_url), typo: 1}
    with pytest.raises(OptionError) as info:
        ckptio.save(plain_state(), "msc://inline/x", storage_options=opts)
    assert str(info.value) == (
        f"unknown option {typo!r} for the msc:// backend (storage_options); did you mean {meant!r}?"
    )


def test_other_options_go_to_the_storage_provider(s3_server: Any, s3_bucket: str) -> None:
    """The config points at a dead endpoint; the storage option's endpoint_url wins. MSC's own
    ``max_concurrency`` (close to ckptio's ``concurrency``) and ``max_pool_connections`` pass too."""
    opts = {
        "msc_config": _config(s3_bucket, "http://127.0.0.1:9"),
        "endpoint_url": s3_server.endpoint_url,
        "max_pool_connections": 3,
        "max_concurrency": 2,
        "part_size": 5 * MiB,
    }
    ckptio.save(plain_state(), "msc://inline/passed-on", storage_options=opts)
    out = empty_plain()
    ckptio.load(out, "msc://inline/passed-on", storage_options=opts)
    check_plain(out)
    _, be = open_backend("msc://inline/passed-on", opts)
    assert isinstance(be, MscS3Backend) and be.transfer.part_size == 5 * MiB
    provider = be.profiles.client("inline")._storage_provider
    assert provider._s3_client.meta.config.max_pool_connections == 3


def test_provider_options_need_a_configured_profile(msc_config: Any, s3_bucket: str) -> None:
    msc_config(s3_bucket=s3_bucket)  # $MSC_CONFIG defines the profile "s3" only
    _, be = open_backend("msc://s3/run", {"max_pool_connections": 3})
    assert be.profiles.client("s3")._storage_provider._s3_client.meta.config.max_pool_connections == 3
    with pytest.raises(StorageError, match="no MSC config defines this profile"):
        open_backend("msc://undefined/run", {"max_pool_connections": 3})


def test_secrets_are_scrubbed_from_errors(s3_server: Any, s3_bucket: str) -> None:
    secret = "sUpErSeCrEt-msc-1234"
    opts = {"msc_config": _config(s3_bucket, s3_server.endpoint_url, secret), "attempts": 1}
    _, be = open_backend("msc://inline/run", opts)
    assert isinstance(be, MscS3Backend)

    def leak() -> None:
        raise ValueError(f"the provider printed its config: secret_key={secret}")

    with pytest.raises(CheckpointError) as info:
        be.call("read", "inline/run/x", leak)
    assert secret not in str(info.value) and "msc://inline/run/x" in str(info.value)


def test_secrets_of_the_config_file_are_scrubbed(msc_config: Any, s3_bucket: str) -> None:
    cfg = msc_config(s3_bucket=s3_bucket)
    _, be = open_backend(cfg.url("s3", "run"))
    secret = cfg.profiles["s3"]["credentials_provider"]["options"]["secret_key"]
    assert secret not in be.errors.scrub(f"...{secret}...")


def test_bad_credentials(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A moto that checks signatures refuses unknown keys: StorageAuthError, secret not in the message."""
    from tests.servers.fixtures import S3Server

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # moto: authenticate every request
    server = S3Server(log_dir=tmp_path)
    try:
        secret = "sUpErSeCrEt-do-not-print-5678"
        cfg = _config("some-bucket", server.endpoint_url, secret)
        cfg["profiles"]["inline"]["credentials_provider"]["options"]["access_key"] = "AKIANOTAREALKEY00000"
        opts = {"msc_config": cfg, "attempts": 2, "backoff": 0.01}
        with pytest.raises(StorageAuthError) as info:
            ckptio.save(plain_state(), "msc://inline/run", storage_options=opts)
        assert secret not in str(info.value) and "msc://inline" in str(info.value)
    finally:
        server.stop()
