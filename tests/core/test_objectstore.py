"""ckptio.objectstore without a server: options, part cutting, the memory bound, ranged reads,
conditional create and secret scrubbing, against in-memory part clients."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from ckptio import objectstore
from ckptio.errors import CheckpointError, CorruptCheckpointError, OptionError, StorageAuthError, StorageError
from ckptio.ext import ErrorMapper, RetryPolicy
from ckptio.objectstore import MultipartWriter, TransferOptions, Transfers

KiB = 1 << 10


class ClientError(Exception):
    """Shaped like botocore's: classified by ``response``."""

    def __init__(self, code: str, status: int, message: str = "") -> None:
        super().__init__(message or code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class FakeParts:
    """A PartClient over a dict; ``gate`` (when set) holds every part upload until it is opened."""

    def __init__(self, gate: threading.Event | None = None, fail_part: int | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.parts: dict[int, bytes] = {}
        self.gate, self.fail_part = gate, fail_part
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0

    def put(self, data: bytes) -> None:
        self.calls.append(("put", len(data)))
        self.objects["obj"] = data

    def start(self) -> str:
        self.calls.append(("start",))
        return "up-1"

    def upload_part(self, upload_id: str, number: int, data: bytes) -> str:
        with self.lock:
            self.in_flight += len(data)
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                assert self.gate.wait(10)
            if number == self.fail_part:
                raise ClientError("InvalidRequest", 400, "part refused")
            with self.lock:
                self.parts[number] = bytes(data)
            return f"etag-{number}"
        finally:
            with self.lock:
                self.in_flight -= len(data)

    def complete(self, upload_id: str, parts: list[tuple[int, str]]) -> None:
        self.calls.append(("complete", [n for n, _ in parts]))
        assert [e for _, e in parts] == [f"etag-{n}" for n, _ in parts]
        self.objects["obj"] = b"".join(self.parts[n] for n, _ in parts)

    def abort(self, upload_id: str) -> None:
        self.calls.append(("abort", upload_id))


def _transfers(**opts: Any) -> Transfers:
    opts.setdefault("retry", RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001))
    return Transfers(TransferOptions(**opts))


def _write(w: MultipartWriter, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        w.write(memoryview(data)[i : i + step])


# -- options ------------------------------------------------------------------------------------
def test_defaults_and_resolved_values() -> None:
    t = TransferOptions()
    assert (t.part_size, t.concurrency, t.threshold, t.chunk_size) == (32 << 20, 8, 64 << 20, 32 << 20)
    assert t.memory_bound == 8 * (32 << 20) and t.retry == RetryPolicy()
    t = TransferOptions(part_size=4 * KiB, multipart_threshold=KiB, read_chunk_size=KiB, max_buffered=8 * KiB)
    assert (t.threshold, t.chunk_size, t.memory_bound) == (4 * KiB, KiB, 8 * KiB)  # threshold >= a part


def test_every_field_is_keyword_only_and_documented() -> None:
    import dataclasses
    import inspect

    lines = [line.strip() for line in inspect.getsource(TransferOptions).splitlines()]
    for f in dataclasses.fields(TransferOptions):
        assert f.kw_only, f.name
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{f.name}: "))
        assert lines[at + 1].startswith('"""'), f"{f.name} has no docstring"


def test_pop_from_takes_ckptio_keys_and_leaves_the_drivers() -> None:
    opts = {"part_size": "8388608", "concurrency": 3, "attempts": 2, "backoff": 0.5, "key": "k", "anon": True}
    t = TransferOptions.pop_from(opts)
    assert opts == {"key": "k", "anon": True}
    assert t.part_size == 8 << 20 and t.concurrency == 3
    assert t.retry == RetryPolicy(attempts=2, base_delay=0.5)
    policy = RetryPolicy(attempts=9)
    assert TransferOptions.pop_from({"retry": policy}).retry is policy
    with pytest.raises(OptionError):
        TransferOptions.pop_from({"retry": policy, "attempts": 2})
    assert TransferOptions.pop_from({"multipart_threshold": None}).threshold == 64 << 20


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("part_sise", "part_size"),
        ("concurency", "concurrency"),
        ("Part_Size", "part_size"),
        ("max_bufered", "max_buffered"),
    ],
)
def test_a_typo_of_a_ckptio_key_names_the_right_one(typo: str, meant: str) -> None:
    with pytest.raises(OptionError) as info:
        TransferOptions.pop_from({typo: 1})
    assert str(info.value) == f"unknown option {typo!r} for storage_options; did you mean {meant!r}?"
    assert isinstance(info.value, (CheckpointError, TypeError))


def test_driver_keywords_and_own_keys_are_not_typos() -> None:
    calls = []

    def driver() -> list[str]:
        calls.append(1)
        return ["max_concurrency"]

    opts = {"max_concurrency": 4, "endpoint_url": "x", "msc_config": {}}
    TransferOptions.pop_from(
        opts, own=("msc_config",), driver=driver
    )  # close to `concurrency`, but the driver's
    assert calls == [1]
    TransferOptions.pop_from({"endpoint_url": "x"}, driver=driver)  # nothing close: the driver is not asked
    assert calls == [1]
    with pytest.raises(OptionError, match="did you mean 'msc_config'"):
        TransferOptions.pop_from({"msc_confg": {}}, own=("msc_config",))


def test_accepted_keywords_reads_signatures_and_param_docs() -> None:
    class Base:
        def __init__(self, anon: bool = False, **kwargs: Any) -> None:
            """:param max_concurrency: documented in kwargs."""

    class Driver(Base):
        def __init__(self, key: str = "", *, token: str = "", **kwargs: Any) -> None:
            super().__init__(**kwargs)

    assert {"anon", "key", "token", "max_concurrency"} <= objectstore.accepted_keywords(Driver)


@pytest.mark.parametrize(
    "bad",
    [{"part_size": 0}, {"concurrency": 0}, {"max_buffered": 100, "part_size": 200}, {"read_chunk_size": -1}],
)
def test_bad_values(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TransferOptions(**bad)
    with pytest.raises(ValueError, match="number"):
        TransferOptions.pop_from({"part_size": "32MiB"})


def test_s3_limits() -> None:
    TransferOptions(part_size=5 << 20).check_s3_limits()
    with pytest.raises(ValueError, match="5 MiB"):
        TransferOptions(part_size=(5 << 20) - 1).check_s3_limits()


# -- multipart writer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "parts"),
    [
        (0, None),
        (1, None),
        (8 * KiB, None),
        (8 * KiB + 1, [4 * KiB, 4 * KiB, 1]),
        (21 * KiB, [4 * KiB] * 5 + [KiB]),
    ],
)
def test_part_cutting(size: int, parts: list[int] | None) -> None:
    """Up to the threshold (two parts) one PUT; above it ``part_size`` parts and a short last one."""
    client, data = FakeParts(), bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    w = MultipartWriter(client, _transfers(part_size=4 * KiB), "mem://b/obj")
    _write(w, data, 3 * KiB + 7)  # writes that straddle part boundaries
    w.commit()
    assert client.objects["obj"] == data
    if parts is None:
        assert client.calls == [("put", size)]
    else:
        assert [len(client.parts[n]) for n in sorted(client.parts)] == parts
        assert client.calls == [("start",), ("complete", list(range(1, len(parts) + 1)))]
    assert w.closed


def test_memory_bound_blocks_the_writer() -> None:
    """With ``max_buffered`` = two parts, a third part waits in ``write()`` until one is stored."""
    gate = threading.Event()
    client = FakeParts(gate=gate)
    w = MultipartWriter(
        client, _transfers(part_size=4 * KiB, concurrency=8, max_buffered=8 * KiB), "mem://b/o"
    )
    data = bytes(40 * KiB)
    done = threading.Event()

    def writer() -> None:
        _write(w, data, KiB)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)
    assert not done.is_set(), "write() did not wait for the memory bound"
    assert client.in_flight <= 8 * KiB and w.transfers.budget.used == 8 * KiB
    gate.set()
    t.join(10)
    assert done.is_set()
    w.commit()
    assert client.objects["obj"] == data
    assert client.peak_in_flight <= 8 * KiB
    assert w.transfers.budget.used == 0


def test_a_failed_part_aborts_the_upload() -> None:
    client = FakeParts(fail_part=2)
    w = MultipartWriter(client, _transfers(part_size=4 * KiB), "mem://b/o")
    with pytest.raises(StorageError, match="upload part 2 of mem://b/o"):
        _write(w, bytes(64 * KiB), 4 * KiB)
        w.commit()
    w.abort()
    assert ("abort", "up-1") in client.calls and "obj" not in client.objects
    assert w.transfers.budget.used == 0


def test_too_many_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "S3_MAX_PARTS", 3)
    w = MultipartWriter(FakeParts(), _transfers(part_size=4 * KiB), "mem://b/o")
    with pytest.raises(StorageError, match="more than 3 parts"):
        _write(w, bytes(20 * KiB), 4 * KiB)
    w.abort()


# -- reads --------------------------------------------------------------------------------------
def test_parallel_ranged_reads_fill_the_destination() -> None:
    blob = bytes(range(256)) * 100
    seen: list[tuple[int, int]] = []
    t = _transfers(part_size=4 * KiB, read_chunk_size=1000, concurrency=4)
    out = bytearray(9000)

    def fetch(start: int, end: int) -> bytes:
        seen.append((start, end))
        return blob[start:end]

    t.read_into("mem://b/o", 77, memoryview(out), fetch)
    assert bytes(out) == blob[77:9077]
    assert sorted(seen) == [(77 + lo, 77 + min(9000, lo + 1000)) for lo in range(0, 9000, 1000)]
    t.close()


def test_truncation_is_one_message() -> None:
    t = _transfers(part_size=4 * KiB, read_chunk_size=1000)
    with pytest.raises(CorruptCheckpointError) as info:
        t.read_into("mem://b/o", 10, memoryview(bytearray(2500)), lambda s, e: bytes(min(e, 2000) - s))
    assert str(info.value) == "mem://b/o is truncated: wanted 2500 bytes at offset 10, got 1990"
    assert info.value.path == "mem://b/o"
    t.close()


# -- conditional create -------------------------------------------------------------------------
class FakeConditional:
    def __init__(self, stored: bytes | None, errors: list[Exception]) -> None:
        self.stored, self.errors = stored, errors

    def put_if_absent(self, data: bytes) -> None:
        if self.errors:
            raise self.errors.pop(0)
        if self.stored is not None:
            raise ClientError("PreconditionFailed", 412)
        self.stored = data

    def holds(self, data: bytes) -> bool:
        return self.stored == data


def test_conditional_create() -> None:
    t = _transfers(retry=RetryPolicy(attempts=3, base_delay=0.001))
    assert t.create_if_absent(FakeConditional(None, []), "mem://l", b"mine")
    assert not t.create_if_absent(FakeConditional(b"theirs", []), "mem://l", b"mine")
    assert t.create_if_absent(FakeConditional(b"mine", []), "mem://l", b"mine"), "our own lost answer"
    slow = [ClientError("SlowDown", 503)]
    assert t.create_if_absent(FakeConditional(None, slow), "mem://l", b"mine")
    conflicts = [ClientError("ConditionalRequestConflict", 409) for _ in range(3)]
    assert not t.create_if_absent(FakeConditional(None, conflicts), "mem://l", b"mine")
    with pytest.raises(StorageAuthError):
        t.create_if_absent(FakeConditional(None, [ClientError("AccessDenied", 403)]), "mem://l", b"x")


# -- secrets ------------------------------------------------------------------------------------
def test_secrets_are_found_and_scrubbed() -> None:
    conn = "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=QUNDT1VOVEtFWQ==;BlobEndpoint=http://h"
    opts = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "connection_string": conn,
        "msc_config": {
            "profiles": {"p": {"credentials_provider": {"options": {"secret_key": "msc-secret"}}}}
        },
        "part_size": 5 << 20,
    }
    found = objectstore.secrets_in(opts)
    assert {"AKIAEXAMPLE", "s3cr3t-value", "msc-secret", "QUNDT1VOVEtFWQ==", conn} <= set(found)
    assert "http://127.0.0.1:9000" not in found and "dev" not in found
    t = Transfers(TransferOptions(retry=RetryPolicy(attempts=1)), ErrorMapper(found))

    def fail() -> None:
        raise ValueError("signature mismatch for s3cr3t-value with msc-secret")

    with pytest.raises(StorageError) as info:
        t.call("read", "s3://b/k", fail)
    assert "s3cr3t-value" not in str(info.value) and "msc-secret" not in str(info.value)
    assert "s3://b/k" in str(info.value)
