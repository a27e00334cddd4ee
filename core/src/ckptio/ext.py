"""The extension API: everything a backend, format or addon author needs from ckptio's core.

Plugins (every distribution under ``backends/`` and ``plugins/``, and third-party ones) import
from ``ckptio``, ``ckptio.ext`` and ``ckptio.errors`` only. The core's other modules are free to
change shape between releases; the names below are kept stable, or deprecated first. ``make
test`` enforces the rule with an import-linter contract (``[tool.importlinter]`` in the root
``pyproject.toml``).

Groups:

- **backends**: :class:`Backend`, :func:`read_limited`, the commit protocol's :class:`Target` and
  :func:`recover`, and the retry machinery (:class:`RetryPolicy`, :func:`retry_call`...).
- **formats**: :class:`Format` and its reader/writer bases, the DCP metadata helpers the native
  format uses, :func:`split_by_size` and :func:`huge_page_empty` for writers' buffers.
- **addons**: :class:`AddonContext`, :class:`AddonHooks`, :func:`addon_hook`, :func:`pretrained_files`.
- **options**: :func:`check_options` refuses an undeclared option naming the closest declared one
  (:class:`~ckptio.OptionError`); formats declare theirs as dataclasses (:class:`NoOptions` when none).
- **distributed helpers**: :func:`rank_and_size`, :func:`on_coordinator`, :func:`all_gather`,
  :func:`broadcast`, :func:`any_failed`, each a no-op on one process.
- **thread pools**: :func:`resolve_thread_count` (a format's ``thread_count`` option, or
  :func:`default_thread_count`: the cores per rank on this machine, from :func:`available_cores`
  and :func:`local_world_size`).
- **plumbing**: :func:`lazy_exports` (cheap package ``__init__``), :func:`tensor_memoryview`,
  :func:`as_cpu_contiguous`, :func:`full_tensor`, :func:`open_backend`, :func:`read_manifest`.
- **async saves**: :class:`HostStager` copies tensors into host buffers reused from one save to
  the next (what ``CheckpointManager(async_save=True)`` blocks on).
"""

from __future__ import annotations

from ._buffers import as_cpu_contiguous, tensor_memoryview
from ._dist import active as dist_active
from ._dist import all_gather, any_failed, broadcast, on_coordinator, rank_and_size
from ._lazy import lazy_exports
from ._threads import available_cores, default_thread_count, local_world_size, resolve_thread_count
from .addons import AddonContext, AddonHooks, addon_hook, pretrained_files
from .backend import Backend, CommitMode, read_limited
from .checkpoint import open_backend, read_manifest
from .commit import Target, file_token, recover, tag_file_name
from .formats.base import (
    FileSizeChecker,
    Format,
    FormatReader,
    FormatWriter,
    NoOptions,
    TensorEntry,
    is_first_rank,
    missing_file,
    tensor_entries,
)
from .formats.native import BLOCK as CHECKSUM_BLOCK
from .formats.native import metadata_from_json, metadata_to_json, split_by_size, tiling_problem
from .gather import full_tensor
from .hookspecs import hookimpl
from .manifest import Manifest
from .options import check_options
from .plugins import get_format
from .retry import (
    ErrorMapper,
    RetryPolicy,
    after_conditional_failure,
    aretry_call,
    classify,
    retry_call,
)
from .staging import HostStager, huge_page_empty
from .state import ModelState
from .url import URL, parse_url

__all__ = [
    "CHECKSUM_BLOCK",
    "URL",
    "AddonContext",
    "AddonHooks",
    "Backend",
    "CommitMode",
    "ErrorMapper",
    "FileSizeChecker",
    "Format",
    "FormatReader",
    "FormatWriter",
    "HostStager",
    "Manifest",
    "NoOptions",
    "ModelState",
    "RetryPolicy",
    "Target",
    "TensorEntry",
    "addon_hook",
    "after_conditional_failure",
    "all_gather",
    "any_failed",
    "aretry_call",
    "as_cpu_contiguous",
    "available_cores",
    "broadcast",
    "check_options",
    "classify",
    "default_thread_count",
    "dist_active",
    "file_token",
    "full_tensor",
    "get_format",
    "hookimpl",
    "huge_page_empty",
    "is_first_rank",
    "lazy_exports",
    "local_world_size",
    "metadata_from_json",
    "metadata_to_json",
    "missing_file",
    "on_coordinator",
    "open_backend",
    "parse_url",
    "pretrained_files",
    "rank_and_size",
    "read_limited",
    "read_manifest",
    "recover",
    "resolve_thread_count",
    "retry_call",
    "split_by_size",
    "tensor_entries",
    "tag_file_name",
    "tensor_memoryview",
    "tiling_problem",
]
