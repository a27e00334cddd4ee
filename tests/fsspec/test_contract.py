"""ckptio-fsspec keeps the backend contract (ckptio.testing) on memory://, and on s3://, gs:// and
az:// against real emulators (moto, fake-gcs-server, Azurite). One bucket per class: the kit gives
each test its own empty prefix below it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from ckptio.testing import BackendContract

MiB = 1 << 20
# small parts, one in flight: the bounded-memory tests then measure the backend, not its buffers
SMALL_PARTS = {"part_size": 5 * MiB, "concurrency": 1}
#: a few parts: the one being filled, the one in flight and the driver's copies of them (measured
#: 21-26 MiB on moto and fake-gcs-server whatever the size written); far below the 64 MiB written
PARTS_LIMIT = 6 * SMALL_PARTS["part_size"]


class TestMemoryContract(BackendContract):
    holds_data_in_memory = True

    @pytest.fixture(scope="class")
    def backend_url(self) -> tuple[str, dict[str, Any]]:
        return f"memory://contract-{uuid.uuid4().hex[:12]}", dict(SMALL_PARTS)


class TestS3Contract(BackendContract):
    memory_limit = PARTS_LIMIT

    @pytest.fixture(scope="class")
    def backend_url(self, s3_server: Any) -> tuple[str, dict[str, Any]]:
        return f"s3://{s3_server.make_bucket()}", s3_server.storage_options(**SMALL_PARTS)


class TestGCSContract(BackendContract):
    memory_limit = PARTS_LIMIT

    @pytest.fixture(scope="class")
    def backend_url(self, gcs_server: Any) -> tuple[str, dict[str, Any]]:
        return f"gs://{gcs_server.make_bucket()}", gcs_server.storage_options(**SMALL_PARTS)


class TestAzureContract(BackendContract):
    memory_limit = PARTS_LIMIT

    @pytest.fixture(scope="class")
    def backend_url(self, azure_server: Any) -> tuple[str, dict[str, Any]]:
        return f"az://{azure_server.make_container()}", azure_server.storage_options(**SMALL_PARTS)
