"""The third-party ``kv://`` example backend against the backend contract (ckptio.testing).

The distribution is not installed here (tests/third_party/test_kvstore_backend.py installs it in a
subprocess's view); its source is imported from the tree and registered at runtime, which is what
``ckptio.register_backend`` is for.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptio import register_backend
from ckptio.plugins import unregister
from ckptio.testing import BackendContract

SRC = Path(__file__).parent / "kvstore_backend" / "src"


@pytest.fixture(scope="module", autouse=True)
def kv_scheme() -> Iterator[None]:
    sys.path.insert(0, str(SRC))
    try:
        from ckptio_kvstore import KVBackend

        register_backend("kv", KVBackend)
        yield
    finally:
        unregister("backend", "kv")
        sys.path.remove(str(SRC))


class TestKVMemoryContract(BackendContract):
    holds_data_in_memory = True

    @pytest.fixture
    def backend_url(self) -> str:
        return f"kv://contract-{uuid.uuid4().hex[:12]}/root"


class TestKVDirectoryContract(BackendContract):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> tuple[str, dict[str, str]]:
        return f"kv://contract-{uuid.uuid4().hex[:12]}/root", {"root": str(tmp_path / "kv")}
