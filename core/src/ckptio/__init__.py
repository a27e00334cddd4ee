"""ckptio: pluggable checkpoint I/O for PyTorch, on torch.distributed.checkpoint.

Quick start::

    import ckptio
    state = {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt), "step": 10}
    ckptio.save(state, "s3://bucket/run/step10")      # or a path, msc://, safetensors+file://...
    ckptio.load(state, "s3://bucket/run/step10")      # in place, resharding if the layout changed

    with ckptio.CheckpointManager("./ckpts", retention=ckptio.KeepLatest(3)) as mgr:
        mgr.save(step, state, metrics={"loss": loss})
"""

from typing import Any as _Any

from .addons import AddonContext, AddonHooks, AddonLike, addon_hook
from .api import load, manifest, save, verify
from .backend import Backend, CommitMode
from .checkpoint import LoadResult, SaveResult
from .copying import CopyResult, copy
from .dcp import storage_reader, storage_writer
from .errors import (
    AddonNotFoundError,
    AsyncSaveError,
    BackendNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    FormatNotFoundError,
    IncompleteCheckpointError,
    InvalidURLError,
    OptionError,
    PluginError,
    RunLockedError,
    StateMismatchError,
    StorageAuthError,
    StorageError,
    UnsafeCheckpointError,
)
from .formats.base import Format, FormatReader, FormatWriter, TensorEntry
from .hookspecs import hookimpl
from .manager import CheckpointManager
from .manifest import Manifest
from .plugins import list_plugins, register_addon, register_backend, register_format, register_plugin
from .reading import load_state
from .retention import KeepBest, KeepEvery, KeepLatest, RetentionPolicy
from .state import ModelState, OptimizerState, PerRank, RNGState
from .tiered import DrainError, TieredCheckpointManager, TieredLoadResult
from .url import URL, parse_url

__version__ = "0.1.0"

__all__ = [
    "URL",
    "AddonContext",
    "AddonHooks",
    "AddonLike",
    "AddonNotFoundError",
    "AsyncSaveError",
    "Backend",
    "BackendNotFoundError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConcurrentWriteError",
    "CopyResult",
    "CommitMode",
    "CorruptCheckpointError",
    "DrainError",
    "Format",
    "FormatNotFoundError",
    "FormatReader",
    "FormatWriter",
    "IncompleteCheckpointError",
    "InvalidURLError",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "LoadResult",
    "Manifest",
    "ModelState",
    "OptimizerState",
    "OptionError",
    "PerRank",
    "PluginError",
    "RunLockedError",
    "RNGState",
    "RetentionPolicy",
    "SaveResult",
    "StateMismatchError",
    "StorageAuthError",
    "StorageError",
    "TensorEntry",
    "TieredCheckpointManager",
    "TieredLoadResult",
    "UnsafeCheckpointError",
    "addon_hook",
    "copy",
    "hookimpl",
    "list_plugins",
    "load",
    "load_state",
    "manifest",
    "parse_url",
    "register_addon",
    "register_backend",
    "register_format",
    "register_plugin",
    "save",
    "storage_reader",
    "storage_writer",
    "verify",
]


def __getattr__(name: str) -> _Any:
    """Old public names, kept working with a :class:`DeprecationWarning`."""
    if name == "AddonSpec":  # the hook specification class: renamed, its meaning unchanged
        import warnings

        warnings.warn(
            "ckptio.AddonSpec is deprecated, use ckptio.AddonHooks", DeprecationWarning, stacklevel=2
        )
        return AddonHooks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
