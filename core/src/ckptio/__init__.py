"""ckptio: pluggable checkpoint I/O for PyTorch, on torch.distributed.checkpoint.

Quick start::

    import ckptio
    state = {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt), "step": 10}
    ckptio.save(state, "s3://bucket/run/step10")      # or a path, msc://, safetensors+file://...
    ckptio.load(state, "s3://bucket/run/step10")      # in place, resharding if the layout changed

    with ckptio.CheckpointManager("./ckpts", retention=ckptio.KeepLatest(3)) as mgr:
        mgr.save(step, state, metrics={"loss": loss})
"""

from .addons import AddonContext, AddonSpec, addon_hook
from .api import load, manifest, save, verify
from .backend import Backend, CommitMode
from .checkpoint import LoadResult, SaveResult
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
from .retention import KeepBest, KeepEvery, KeepLatest, RetentionPolicy
from .state import ModelState, OptimizerState, PerRank, RNGState
from .url import URL, parse_url

__version__ = "0.1.0"

__all__ = [
    "URL",
    "AddonContext",
    "AddonNotFoundError",
    "AddonSpec",
    "AsyncSaveError",
    "Backend",
    "BackendNotFoundError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConcurrentWriteError",
    "CommitMode",
    "CorruptCheckpointError",
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
    "UnsafeCheckpointError",
    "addon_hook",
    "hookimpl",
    "list_plugins",
    "load",
    "manifest",
    "parse_url",
    "register_addon",
    "register_backend",
    "register_format",
    "register_plugin",
    "save",
    "verify",
]
