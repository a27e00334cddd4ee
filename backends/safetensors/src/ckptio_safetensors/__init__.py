"""ckptio-safetensors: Hugging Face safetensors as a ckptio format.

Use it with a ``safetensors+`` URL prefix (``safetensors+file:///ckpt``, ``safetensors+s3://b/run``,
``safetensors+msc://profile/run``); loads find the format in the manifest, so a plain URL loads it
back. Every byte goes through the backend's file API (streaming ``open_write``, ranged
``read_into``), so the format works on every backend.

Layout of a checkpoint saved from ``{"model": ModelState(m), "optim": OptimizerState(m, o),
"step": 10, "w": tensor}`` by N ranks::

    manifest.json                     ckptio commit record: DCP metadata as JSON, per-chunk
                                      file/position/length/xxh3-64 (written last)
    model/rank00000-00.safetensors    rank 0's chunks of the model, named by the model's own FQNs
    model/rank00001-00.safetensors    (model.layers.0.self_attn.q_proj.weight ...); -01, -02...
                                      when a rank writes big groups with several threads
    model/model.safetensors.index.json  only when every tensor of the group is stored whole
                                      (e.g. one rank): then model/ is a plain HF directory
    optim/rank0000r-00.safetensors    each top-level dict/Stateful entry is its own directory,
                                      names are the rest of its dotted path (optim.state.<fqn>.exp_avg)
    rank0000r-00.safetensors          top-level tensors (a flat dict of tensors is stored as is)
    values-rank0000r.json             non-tensor values, ``{fqn: value}`` in ckptio's JSON encoding

Every ``.safetensors`` file is complete and valid on its own (``safetensors.torch.load_file``
reads it); its ``__metadata__`` holds ``format: pt``, ``ckptio_sharding`` (JSON: each tensor's
global shape and the offsets of this chunk in it) and torch's ``DCP_SHARDING_INFO``, so torch's
HF reader and consolidator understand it too. Every DTensor shard of every rank is written (torch's
HF writer keeps one rank's by default); replicated plain tensors are written once.

Loads reshard to any world size through DCP's planner; destinations are filled by ranged reads
(only the rows needed when resharding without verification). A directory written by
``save_pretrained`` (``model.safetensors`` or sharded with ``model.safetensors.index.json``) has
no manifest and is detected; its tensors go under the state's single top-level entry
(``{"model": ModelState(m)}``) or at the top level (a flat dict), or under ``prefix=``, with an
optional ``key_mapping={regex: replacement}`` (first match wins). Loaded into a transformers
model, such a directory follows the model's own checkpoint conversion (MoE experts stored one by
one, fused in memory), is cast to the destination's dtypes (``dtype_policy``), fills tied weights
stored once, and materialises a meta-device model first (see ``docs/hf.md``); ``hf-cache://org/name``
reads one from the local Hugging Face cache, offline.

:func:`consolidate` turns any of these into ``model-0000i-of-0000N.safetensors`` + index for
``from_pretrained``; :func:`write_hf_checkpoint` writes full tensors in that layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # the names below are imported on first use (see ckptio._lazy)
    from .cli import add_consolidate_arguments, main_consolidate, run_consolidate
    from .consolidation import consolidate, reference_dtypes
    from .conversion import hf_tensors, load_plan
    from .format import SafetensorsFormat
    from .hf import INDEX_NAME, parse_cast, parse_size, write_hf_checkpoint
    from .hf_cache import resolve_snapshot
    from .modelinit import materialize, reset_non_persistent_buffers

_EXPORTS = {
    "add_consolidate_arguments": ".cli",
    "consolidate": ".consolidation",
    "hf_tensors": ".conversion",
    "load_plan": ".conversion",
    "materialize": ".modelinit",
    "reset_non_persistent_buffers": ".modelinit",
    "resolve_snapshot": ".hf_cache",
    "INDEX_NAME": ".hf",
    "main_consolidate": ".cli",
    "parse_cast": ".hf",
    "parse_size": ".hf",
    "reference_dtypes": ".consolidation",
    "run_consolidate": ".cli",
    "SafetensorsFormat": ".format",
    "write_hf_checkpoint": ".hf",
}
__all__ = [
    "INDEX_NAME",
    "SafetensorsFormat",
    "add_consolidate_arguments",
    "consolidate",
    "hf_tensors",
    "load_plan",
    "main_consolidate",
    "materialize",
    "parse_cast",
    "parse_size",
    "reference_dtypes",
    "reset_non_persistent_buffers",
    "resolve_snapshot",
    "run_consolidate",
    "write_hf_checkpoint",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
