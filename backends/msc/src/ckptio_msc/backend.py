"""ckptio backends for NVIDIA multi-storage-client (MSC) profiles: ``msc://profile/path``.

MSC reads its config from ``$MSC_CONFIG`` or its standard locations (``~/.msc_config.yaml``,
``~/.config/msc/config.yaml``, ``/etc/msc_config.yaml``...), or from ``storage_options={"msc_config":
{...}}`` (the same dict as the YAML file) when a run carries its own. A backend path is
``profile/key``; the key is relative to the profile's ``base_path``.

``storage_options``: ckptio's transfer options (:class:`ckptio.objectstore.TransferOptions`) and
``msc_config``; every other key is passed on to MSC as an option of the profile's
``storage_provider`` (``endpoint_url``, ``region_name``, ``max_pool_connections``...), overriding
the config's, so the profile must be defined in the config (file or ``msc_config``).

The commit mode follows the profile's *declared provider type*, never the path:

* a POSIX ``file`` provider is a local or shared file system: :class:`MscPosixBackend` delegates to
  ckptio's local backend on the physical path (fsync, ``commit_mode = "rename"``).
* every other provider is an object store: :class:`MscBackend`, ``commit_mode = "marker"``, an
  adapter over :mod:`ckptio.objectstore`.

Why not MSC's own ``open("wb")``: it keeps the whole object in a ``BytesIO`` until ``close()``,
i.e. a checkpoint file's full size in RAM. Instead, on ``s3`` providers (boto3 client) writes are a
:class:`~ckptio.objectstore.MultipartWriter` over the provider's boto3 client: one ``PutObject`` up
to ``multipart_threshold`` (default two parts, the 64 MiB MSC itself uses), parallel parts above
it, within the memory bound, and nothing touches local disk. Other providers (gcs, azure, oci,
ais...) have no multipart API that MSC exposes per part, so their writes spool into a
``SpooledTemporaryFile`` (in memory up to ``part_size``, then a local temporary file) which MSC's
``upload_file`` sends with the provider's own parallel transfer manager on close: bounded memory,
at the price of a local temp copy.

**Create-if-absent** (:meth:`~ckptio.backend.Backend.create_bytes`, the commit of a manifest and
the run lock): on ``s3`` profiles (:class:`MscS3Backend`) it is one ``PutObject`` with
``If-None-Match: *`` through the provider's boto3 client, atomic (see
:meth:`ckptio.objectstore.Transfers.create_if_absent`). POSIX profiles use the local backend's
``link(2)``. Other providers check then write (MSC 1.3 raises ``NotImplementedError`` for
``if_none_match="*"`` on gcs and azure), so their ``atomic_create`` is ``False``.

On POSIX profiles the profile's ``base_path`` may itself lie below a symlink (``/data`` linking to
another disk): it is resolved once, and below it the local backend follows no link (see
:mod:`ckptio_local.backend`).

Reads are parallel ranged reads (``StorageClient.read(key, byte_range=Range(...))``) copied into the
destination buffer. Every call is retried on transient failures, on top of MSC's per-profile
``retry`` settings, and error messages never show a secret of the options or the MSC config.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from ckptio import objectstore
from ckptio.errors import CheckpointError, CheckpointNotFoundError, InvalidURLError, StorageError
from ckptio.ext import URL, Backend, ErrorMapper
from ckptio_local import LocalBackend


def _msc() -> Any:
    try:
        import multistorageclient
    except ImportError as exc:  # pragma: no cover - a declared dependency
        from ckptio.errors import BackendNotFoundError

        raise BackendNotFoundError("msc:// needs multi-storage-client: pip install ckptio-msc") from exc
    return multistorageclient


def _provider_config(config: dict[str, Any] | None, profile: str) -> Any:
    """The profile's ``storage_provider`` entry in ``config`` (``None``: MSC's config file)."""
    if config is None:
        config = _msc().StorageClientConfig.read_msc_config()[0] or {}
    return config.get("profiles", {}).get(profile, {}).get("storage_provider")


def _provider_keywords(config: dict[str, Any] | None, profile: str) -> set[str]:
    """The options the profile's storage provider class takes (a typo of ckptio's is refused,
    MSC's own ``max_concurrency`` is not)."""
    with contextlib.suppress(Exception):
        from multistorageclient.config import STORAGE_PROVIDER_MAPPING

        kind = _provider_config(config, profile)["type"]
        providers = importlib.import_module("multistorageclient.providers")
        return objectstore.accepted_keywords(getattr(providers, STORAGE_PROVIDER_MAPPING[kind]))
    return set()


class _Profiles:
    """One MSC ``StorageClient`` per profile, from ``msc_config`` when given, else MSC's config
    file; ``provider_options`` override each profile's ``storage_provider`` options."""

    def __init__(
        self, config: dict[str, Any] | None, provider_options: dict[str, Any], errors: ErrorMapper
    ) -> None:
        self.config, self.provider_options, self.errors = config, provider_options, errors
        self.clients: dict[str, Any] = {}
        self.lock = threading.Lock()

    def client(self, profile: str) -> Any:
        with self.lock:
            if profile not in self.clients:
                self.clients[profile] = self._open(profile)
            return self.clients[profile]

    def _open(self, profile: str) -> Any:
        msc = _msc()
        try:
            config = self.config
            if self.provider_options:
                if config is None:
                    config = msc.StorageClientConfig.read_msc_config()[0] or {}
                config = copy.deepcopy(config)
                provider = _provider_config(config, profile)
                if not isinstance(provider, dict):
                    raise StorageError(
                        f"msc://{profile}: storage options {sorted(self.provider_options)} are passed on as "
                        "options of the profile's storage_provider, and no MSC config defines this profile"
                    )
                provider.setdefault("options", {}).update(self.provider_options)
            if config is not None:
                client = msc.StorageClient(msc.StorageClientConfig.from_dict(config, profile=profile))
            else:
                client, _ = msc.resolve_storage_client(f"msc://{profile}/")
        except CheckpointError:
            raise
        except Exception as exc:
            raise StorageError(
                f"msc://{profile}: cannot open this multi-storage-client profile ({type(exc).__name__}: "
                f"{self.errors.scrub(str(exc)[:300])}); define it in $MSC_CONFIG or ~/.msc_config.yaml, or "
                "pass storage_options={'msc_config': {...}}"
            ) from exc
        resolved = getattr(getattr(client, "_config", None), "_config_dict", None)
        if isinstance(resolved, dict):  # the config file's secrets are scrubbed too
            self.errors.secrets = ErrorMapper(
                [*self.errors.secrets, *objectstore.secrets_in(resolved)]
            ).secrets
        return client

    def split(self, path: str) -> tuple[Any, str]:
        profile, _, key = path.partition("/")
        if not profile:
            raise InvalidURLError(f"msc://{path}: no profile name")
        return self.client(profile), key


def _is_s3(client: Any) -> bool:
    return type(client._storage_provider).__name__ == "S3StorageProvider"


def _s3_object(client: Any, key: str) -> objectstore.S3Object:
    """``key`` of an ``s3`` profile as an :class:`~ckptio.objectstore.S3Object` on its boto3 client."""
    from multistorageclient.utils import split_path

    provider = client._storage_provider
    bucket, object_key = split_path(provider._prepend_base_path(key))
    s3 = provider._s3_client
    return objectstore.S3Object(
        lambda operation, **params: getattr(s3, operation)(**params), bucket, object_key
    )


def open_msc_backend(url: URL, **storage_options: Any) -> Backend:
    """The backend factory: the profile's provider type picks the commit mode (see the module doc)."""
    opts = dict(storage_options)
    profile = url.path.partition("/")[0]
    transfer = objectstore.TransferOptions.pop_from(
        opts,
        own=("msc_config",),
        driver=lambda: _provider_keywords(opts.get("msc_config"), profile),
        where=f"the {url.scheme}:// backend (storage_options)",
    )
    errors = ErrorMapper(objectstore.secrets_in(opts))
    profiles = _Profiles(opts.pop("msc_config", None), opts, errors)
    client, _ = profiles.split(url.path)
    if client._is_posix_file_storage_provider():
        return MscPosixBackend(url, profiles)
    transfers = objectstore.Transfers(transfer, errors, "ckptio-msc")
    if _is_s3(client):
        transfer.check_s3_limits()
        return MscS3Backend(url, profiles, transfers)
    return MscBackend(url, profiles, transfers)


class MscBackend(objectstore.ObjectStoreBackend):
    """An object-store MSC profile (see the module docstring); :func:`open_msc_backend` builds it."""

    def __init__(self, url: URL, profiles: _Profiles, transfers: objectstore.Transfers) -> None:
        super().__init__("msc", transfers)
        self.profiles = profiles

    # -- transfers ------------------------------------------------------------------------------
    def fetch_range(self, path: str, start: int, end: int) -> bytes:
        client, key = self.profiles.split(path)
        return bytes(client.read(key, byte_range=_msc().types.Range(offset=start, size=end - start)))

    def writer(self, path: str) -> objectstore.Upload:
        client, key = self.profiles.split(path)
        if _is_s3(client) and not client._is_rust_client_enabled():
            return objectstore.MultipartWriter(_s3_object(client, key), self.transfers, self.url(path))
        return _Spooled(self, path, client, key)

    # -- metadata -----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        client, key = self.profiles.split(path)
        if not key:
            return True
        prefix = key.rstrip("/") + "/"
        return bool(self.call("check", path, lambda: client.is_file(key) or not client.is_empty(prefix)))

    def size(self, path: str) -> int:
        client, key = self.profiles.split(path)
        meta = self.call("stat", path, lambda: client.info(key))
        if getattr(meta, "type", "file") == "directory":
            raise CheckpointNotFoundError(f"{self.url(path)} is a directory, not a file")
        return int(meta.content_length)

    def listdir(self, path: str) -> list[str]:
        client, key = self.profiles.split(path)
        prefix = key.rstrip("/") + "/" if key else ""

        def ls() -> list[str]:
            names: set[str] = set()
            for meta in client.list(prefix, include_directories=True):
                rel = str(meta.key)[len(prefix) :] if str(meta.key).startswith(prefix) else str(meta.key)
                first = rel.strip("/").split("/", 1)[0]
                if first:
                    names.add(first)
            return sorted(names)

        try:
            return self.call("list", path, ls)
        except FileNotFoundError:
            return []

    def walk_files(self, path: str) -> Iterator[str]:
        client, key = self.profiles.split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        metas = self.call("list", path, lambda: list(client.list(prefix)))
        for meta in sorted(metas, key=lambda m: str(m.key)):
            rel = str(meta.key)[len(prefix) :]
            if rel and getattr(meta, "type", "file") == "file":
                yield rel

    def remove(self, path: str, recursive: bool = False) -> None:
        client, key = self.profiles.split(path)

        def rm() -> None:
            try:
                if recursive:
                    if not client.is_empty(key.rstrip("/") + "/"):
                        client.delete(key.rstrip("/") + "/", recursive=True)
                    if client.is_file(key):
                        client.delete(key)
                else:
                    client.delete(key)
            except FileNotFoundError:
                pass

        try:
            self.call("delete", path, rm)
        except FileNotFoundError:
            pass


class MscS3Backend(MscBackend):
    """An ``s3`` MSC profile: ``create_bytes`` is a conditional ``PutObject`` (atomic)."""

    atomic_create = True

    def conditional_client(self, path: str) -> objectstore.S3Object | None:
        client, key = self.profiles.split(path)
        return _s3_object(client, key) if _is_s3(client) else None  # None: a path on another profile


class _Spooled:
    """Providers without a per-part API: spool locally (in RAM up to ``part_size``), upload on commit."""

    def __init__(self, backend: MscBackend, path: str, client: Any, key: str) -> None:
        self.backend, self.path, self.client, self.key = backend, path, client, key
        self.tmp = tempfile.SpooledTemporaryFile(max_size=backend.transfer.part_size, prefix="ckptio-msc-")

    def write(self, b: Any) -> int:
        return self.tmp.write(b)

    def commit(self) -> None:
        try:
            size = self.tmp.tell()
            self.tmp.seek(0)
            if size <= self.backend.transfer.part_size:  # small: still in memory, one PUT
                data = self.tmp.read()
                self.backend.call("write", self.path, lambda: self.client.write(self.key, data))
            else:

                def upload() -> None:
                    self.tmp.seek(0)
                    self.client.upload_file(self.key, self.tmp)

                self.backend.call("upload", self.path, upload)
        finally:
            self.tmp.close()

    def abort(self) -> None:
        self.tmp.close()


class MscPosixBackend(Backend):
    """A POSIX ``file`` MSC profile: ckptio's local backend on the profile's physical paths."""

    commit_mode = "rename"
    atomic_create = True

    def __init__(self, url: URL, profiles: _Profiles) -> None:
        super().__init__("msc")
        self.profiles = profiles
        self.local = LocalBackend()
        self._bases: dict[str, tuple[str, str]] = {}  # profile -> (base as configured, resolved)

    def _base(self, profile: str, client: Any) -> tuple[str, str]:
        """The profile's physical base path, as MSC spells it and with its links resolved once."""
        if profile not in self._bases:
            base = client.get_posix_path("")
            if base is None:  # pragma: no cover - only POSIX profiles reach here
                raise StorageError(f"msc://{profile}: profile has no POSIX path")
            base = os.path.normpath(str(base))
            self._bases[profile] = (base, os.path.realpath(base))
        return self._bases[profile]

    def lp(self, path: str) -> str:
        profile = path.partition("/")[0]
        client, key = self.profiles.split(path)
        physical = client.get_posix_path(key)
        if physical is None:  # pragma: no cover - only POSIX profiles reach here
            raise StorageError(f"msc://{path}: profile has no POSIX path")
        base, real = self._base(profile, client)
        physical = os.path.normpath(str(physical))
        if physical == base or physical.startswith(base.rstrip("/") + "/"):
            physical = real + physical[len(base) :] if base != "/" else physical
        return physical

    def resolve(self, path: str) -> str:
        """Follow the user's links below the profile's base once (kept when they leave the base)."""
        profile, _, key = path.partition("/")
        client, _ = self.profiles.split(path)
        _, real = self._base(profile, client)
        target = os.path.realpath(self.lp(path))
        if target == real:
            return profile
        if target.startswith(real.rstrip("/") + "/"):
            return f"{profile}/{target[len(real.rstrip('/')) + 1 :]}"
        return path  # outside the profile: the local backend will refuse the link, naming it

    def create_bytes(self, path: str, data: bytes) -> bool:
        return self.local.create_bytes(self.lp(path), data)

    def walk_files(self, path: str) -> Iterator[str]:
        return self.local.walk_files(self.lp(path))

    def url(self, path: str) -> str:
        return f"msc://{path}"

    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.local.open_write(self.lp(path))

    def open_read(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.local.open_read(self.lp(path))

    def read_bytes(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.local.read_bytes(self.lp(path), offset, length)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        self.local.read_into(self.lp(path), offset, out)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.local.write_bytes(self.lp(path), data)

    def exists(self, path: str) -> bool:
        return self.local.exists(self.lp(path))

    def size(self, path: str) -> int:
        return self.local.size(self.lp(path))

    def listdir(self, path: str) -> list[str]:
        return self.local.listdir(self.lp(path))

    def is_dir(self, path: str) -> bool:
        return self.local.is_dir(self.lp(path))

    def remove(self, path: str, recursive: bool = False) -> None:
        self.local.remove(self.lp(path), recursive)

    def makedirs(self, path: str) -> None:
        self.local.makedirs(self.lp(path))

    def rename(self, src: str, dst: str) -> None:
        self.local.rename(self.lp(src), self.lp(dst))

    def fsync_dir(self, path: str) -> None:
        self.local.fsync_dir(self.lp(path))

    def local_path(self, path: str) -> str | None:
        return self.lp(path)
