"""ckptio-local keeps the backend contract (ckptio.testing) on a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckptio.testing import BackendContract


class TestLocalContract(BackendContract):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return str(tmp_path / "root")
