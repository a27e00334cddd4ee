"""The format interface: how tensors are laid out in files, on top of any backend.

A format turns DCP's plans into files through a :class:`~ckptio.Backend`'s file API, so each format
works on every backend. The commit (manifest, rename or marker) is not the format's business: the
core does it the same way for all formats after :meth:`FormatWriter.finish` has gathered what each
rank wrote.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from ..backend import Backend
from ..commit import tag_file_name
from ..errors import CorruptCheckpointError
from ..manifest import Manifest
from ..serialization import dtype_name


@dataclass
class TensorEntry:
    """One stored tensor (or chunk of one), as ``ckptio inspect`` shows it."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    file: str
    offsets: list[int] | None = None


def tensor_entries(metadata: Metadata, entries: Iterable[Any]) -> list[TensorEntry]:
    """``ckptio inspect``'s listing from DCP metadata and a format's chunk table, in file order.

    ``entries`` are the format's stored chunks: objects with ``fqn``, ``file``, ``pos``,
    ``length`` and ``offsets`` (``None`` for JSON values).
    """
    out = []
    for e in sorted(entries, key=lambda e: (e.file, e.pos)):
        m = metadata.state_dict_metadata[e.fqn]
        if isinstance(m, TensorStorageMetadata):
            shape = list(m.size)
            out.append(
                TensorEntry(
                    e.fqn,
                    dtype_name(m.properties.dtype, e.fqn),
                    shape,
                    e.length,
                    e.file,
                    list(e.offsets or ()),
                )
            )
        else:
            out.append(TensorEntry(e.fqn, "json", [], e.length, e.file))
    return out


def missing_file(backend: Backend, fpath: str, exc: BaseException | None = None) -> CorruptCheckpointError:
    """The error for a data file a committed manifest lists but the store does not have.

    It is corruption, never :class:`~ckptio.errors.CheckpointNotFoundError`: that one is a
    ``FileNotFoundError``, which a "start fresh when there is no checkpoint" handler would swallow.
    """
    url = backend.url(fpath)
    err = CorruptCheckpointError(
        f"{url} is missing: the committed checkpoint lists it, so its data was lost or deleted", path=url
    )
    err.__cause__ = exc
    return err


def is_first_rank() -> bool:
    """Rank 0 of the default group, or a process without ``torch.distributed``."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class FileSizeChecker:
    """Compares the sizes a manifest declares with the real files, once per file, before any read.

    Every byte range a reader uses was checked to lie inside its file's *declared* size; this makes
    the declared sizes true, so a manifest cannot describe more data than the files hold (a
    2**40-element tensor needs 2**40 elements of real files before anything is allocated for it).
    A listed file that does not exist is corruption (:func:`missing_file`). Sizes are fetched on
    up to ``threads`` threads (one ``HEAD`` each on object stores).
    """

    def __init__(
        self, backend: Backend, path: str, files: Mapping[str, Mapping[str, Any]], threads: int = 8
    ) -> None:
        self.backend = backend
        self.path = path
        self.files = files
        self.threads = max(1, threads)
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def check(self, names: Iterable[str]) -> None:
        with self._lock:
            todo = sorted(set(names) - self._done)
        if not todo:
            return
        if len(todo) == 1 or self.threads == 1:
            for name in todo:
                self._check_one(name)
        else:
            with ThreadPoolExecutor(min(self.threads, len(todo)), thread_name_prefix="ckptio-size") as pool:
                list(pool.map(self._check_one, todo))
        with self._lock:
            self._done.update(todo)

    def _check_one(self, name: str) -> None:
        fpath = self.backend.join(self.path, name)
        try:
            actual = self.backend.size(fpath)
        except FileNotFoundError as exc:  # CheckpointNotFoundError is one
            raise missing_file(self.backend, fpath, exc) from exc
        declared = self.files[name]["size"]
        if actual != declared:
            url = self.backend.url(fpath)
            raise CorruptCheckpointError(f"{url} has {actual} bytes, the manifest says {declared}", path=url)


class FormatWriter(StorageWriter):
    """Boilerplate for format writers: per-rank file prefixes and result collection.

    Subclasses implement :meth:`write_items` (on every rank) and :meth:`build_metadata` (on the
    coordinator, from every rank's results). After ``finish`` the coordinator's writer holds
    :attr:`format_metadata` and :attr:`files`, which the core puts in the manifest.
    """

    def __init__(
        self, backend: Backend, path: str, options: Any = None, *, progress: bool | None = None
    ) -> None:
        super().__init__()
        self.backend = backend
        self.path = path
        #: The format's save options: an instance of its :attr:`Format.save_options` class.
        self.options = options
        #: ``False`` hides progress bars (background saves); ``None`` lets the terminal decide.
        self.progress = progress
        self.rank = 0
        self.is_coordinator = True
        self.format_metadata: dict[str, Any] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.bytes_written = 0
        #: Set by the core on ``marker`` stores, where saves write in place: data files are
        #: then named with it (:meth:`file_name`), so that two saves never share an object.
        self.save_token = ""
        self._file_token = ""

    def file_name(self, name: str) -> str:
        """The name under which to write the data file ``name`` in this save."""
        return tag_file_name(name, self._file_token)

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        tag = f"@{self.save_token}" if self.save_token else ""
        return [dataclasses.replace(p, storage_data=f"__{i}{tag}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        data = plan.storage_data if isinstance(plan.storage_data, str) else f"__{self.rank}"
        prefix, _, self._file_token = data.partition("@")  # the token reaches every rank this way
        results = self.write_items(list(plan.items), planner, prefix)
        self.bytes_written = sum(r.size_in_bytes for r in results)
        fut: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        flat = [r for rank_results in results for r in rank_results]
        self.format_metadata, self.files = self.build_metadata(metadata, flat)

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    @abc.abstractmethod
    def write_items(self, items: list[WriteItem], planner: SavePlanner, prefix: str) -> list[WriteResult]:
        """Write this rank's items to files named with ``prefix``; return one result per item."""

    @abc.abstractmethod
    def build_metadata(
        self, metadata: Metadata, results: list[WriteResult]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Return ``(format_metadata, files)`` for the manifest: JSON only."""


class FormatReader(StorageReader):
    """Boilerplate for format readers: the metadata is known before DCP asks (it comes from the
    manifest or from file headers), and reads need no storage-level planning. Subclasses set
    :attr:`metadata` and implement ``read_data``."""

    metadata: Metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        return None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """The options of a format that takes none (the default :attr:`Format.save_options` and
    :attr:`Format.load_options`)."""


class Format(abc.ABC):
    """A checkpoint format, registered by name through the ``register_formats`` hook."""

    name: ClassVar[str] = ""
    #: The options ``save`` accepts for this format: a keyword-only dataclass with one documented
    #: field per option. The core refuses any other keyword (:class:`~ckptio.OptionError`) before
    #: writing and hands :meth:`storage_writer` an instance.
    save_options: ClassVar[type[Any]] = NoOptions
    #: The options ``load`` accepts for this format, as :attr:`save_options`, for :meth:`storage_reader`.
    load_options: ClassVar[type[Any]] = NoOptions

    @abc.abstractmethod
    def storage_writer(
        self, backend: Backend, path: str, options: Any = None, *, progress: bool | None = None
    ) -> FormatWriter:
        """A DCP writer that puts files under ``path`` (a staging or final directory).

        :param options: an instance of :attr:`save_options` (``None``: the defaults).
        :param progress: ``False`` hides progress bars (background saves); ``None`` lets the
            terminal decide (``CKPTIO_PROGRESS``).
        """

    @abc.abstractmethod
    def storage_reader(
        self,
        backend: Backend,
        path: str,
        manifest: Manifest | None,
        options: Any = None,
        *,
        verify: bool = True,
        progress: bool | None = None,
        state_keys: Sequence[str] = (),
    ) -> StorageReader:
        """A DCP reader for the checkpoint at ``path``. ``manifest`` is ``None`` for foreign
        checkpoints that :meth:`detect` recognised (e.g. a ``save_pretrained`` directory).

        :param options: an instance of :attr:`load_options` (``None``: the defaults).
        :param verify: check checksums while reading (``load(verify=...)``).
        :param progress: as for :meth:`storage_writer`.
        :param state_keys: the top-level keys of the state being loaded (after addons' renames),
            for formats that place a foreign checkpoint's tensors in it.
        """

    def detect(self, backend: Backend, path: str) -> bool:
        """Whether ``path`` holds a checkpoint of this format written by another tool."""
        return False

    def verify(self, backend: Backend, path: str, manifest: Manifest) -> int:
        """Re-read every stored byte and check it; return the bytes checked.

        Raises :class:`~ckptio.errors.CorruptCheckpointError` naming the damaged file. A chunk or
        value without a checksum, or a listed file that is missing, is damage too.
        """
        raise NotImplementedError(f"format {self.name!r} cannot verify checkpoints")

    def tensors(self, backend: Backend, path: str, manifest: Manifest | None) -> list[TensorEntry]:
        """What is stored, for ``ckptio inspect``."""
        return []
