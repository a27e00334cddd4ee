"""ckptio-fsspec as an adapter over ckptio.objectstore: declared options and scrubbed secrets."""

from __future__ import annotations

import uuid
from typing import Any

import ckptio
import pytest
from ckptio.checkpoint import open_backend
from ckptio.errors import CheckpointError, OptionError
from ckptio_fsspec import FsspecBackend

from ._helpers import plain_state

MiB = 1 << 20


@pytest.mark.parametrize("scheme", ["memory", "s3"])
def test_a_misspelt_option_names_the_right_one(scheme: str) -> None:
    url = f"{scheme}://bucket-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(OptionError) as info:
        ckptio.save(plain_state(), url, storage_options={"part_sise": 8 * MiB})
    assert str(info.value) == (
        f"unknown option 'part_sise' for the {scheme}:// backend (storage_options); did you mean 'part_size'?"
    )
    assert isinstance(info.value, TypeError)


def test_driver_options_pass_through(s3_server: Any, s3_bucket: str) -> None:
    """s3fs's own ``max_concurrency`` is close to ckptio's ``concurrency`` but is the driver's."""
    opts = s3_server.storage_options(max_concurrency=3, part_size=5 * MiB, max_buffered=10 * MiB)
    _, be = open_backend(f"s3://{s3_bucket}", opts)
    assert isinstance(be, FsspecBackend)
    assert be.fs.max_concurrency == 3
    assert be.transfer.part_size == 5 * MiB and be.transfer.memory_bound == 10 * MiB
    assert "part_size" not in be.options and "max_concurrency" in be.options


def test_s3_part_size_minimum() -> None:
    with pytest.raises(CheckpointError, match="at least 5 MiB"):
        open_backend("s3://b/run", {"part_size": MiB, "anon": True})
    _, be = open_backend(f"memory://m-{uuid.uuid4().hex[:8]}", {"part_size": MiB})  # no multipart there
    assert be.transfer.part_size == MiB


def test_secrets_are_scrubbed_from_errors(s3_server: Any, s3_bucket: str) -> None:
    secret = "sUpErSeCrEt-fsspec-5678"
    opts = dict(s3_server.storage_options(), secret=secret, attempts=1)
    _, be = open_backend(f"s3://{s3_bucket}", opts)
    assert isinstance(be, FsspecBackend)

    def leak() -> None:
        raise ValueError(f"the driver printed its config: secret={secret}")

    with pytest.raises(CheckpointError) as info:
        be.call("read", f"{s3_bucket}/x", leak)
    assert secret not in str(info.value) and f"s3://{s3_bucket}/x" in str(info.value)
