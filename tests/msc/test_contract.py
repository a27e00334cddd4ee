"""ckptio-msc keeps the backend contract (ckptio.testing): an MSC ``s3`` profile on moto (object
store, marker commit) and a POSIX ``file`` profile (rename commit). The profiles travel in
``storage_options={"msc_config": ...}``, so one backend serves a whole class."""

from __future__ import annotations

from typing import Any

import pytest
from ckptio.testing import BackendContract

MiB = 1 << 20
# small parts, one in flight: the bounded-memory tests then measure the backend, not its buffers
SMALL_PARTS = {"part_size": 5 * MiB, "concurrency": 1}


class TestMscS3Contract(BackendContract):
    # measured ~26 MiB whatever the size written (64 or 160 MiB): about five parts at the switch to
    # a multipart upload (the two-part buffer held below multipart_threshold, plus copies of a part)
    memory_limit = 6 * SMALL_PARTS["part_size"]

    @pytest.fixture(scope="class")
    def backend_url(self, s3_server: Any) -> tuple[str, dict[str, Any]]:
        profile = {
            "storage_provider": {
                "type": "s3",
                "options": {
                    "base_path": s3_server.make_bucket(),
                    "endpoint_url": s3_server.endpoint_url,
                    "region_name": s3_server.region,
                },
            },
            "credentials_provider": {
                "type": "S3Credentials",
                "options": {"access_key": s3_server.access_key, "secret_key": s3_server.secret_key},
            },
        }
        return "msc://contract/runs", {"msc_config": {"profiles": {"contract": profile}}, **SMALL_PARTS}


class TestMscPosixContract(BackendContract):
    @pytest.fixture(scope="class")
    def backend_url(self, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
        base = tmp_path_factory.mktemp("msc-posix")
        profile = {"storage_provider": {"type": "file", "options": {"base_path": str(base)}}}
        return "msc://contract/runs", {"msc_config": {"profiles": {"contract": profile}}}
