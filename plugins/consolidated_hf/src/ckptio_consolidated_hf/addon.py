"""The ``consolidated-hf`` addon: a ``from_pretrained``-ready copy of the model inside the step.

After the checkpoint is committed (``after_commit``: off the critical path, and in the
background thread when the manager saves asynchronously), this writes ``<step>/consolidated/``:
``config.json``, ``generation_config.json``, the tokenizer files (``tokenizer=``), and the weights
as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``, loadable with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

Where the weights come from (``source``):

* ``"memory"``: the state dict captured at save time (the live tensors for a synchronous save, the
  host-staged copy for an asynchronous one, which the manager keeps until ``after_commit`` is done),
  written by rank 0 through ``ckptio_safetensors.write_hf_checkpoint``. DTensor shards are gathered
  over ckptio's process group first, so rank 0 holds the whole model once.
* ``"checkpoint"``: the committed checkpoint is read back by ``ckptio_safetensors``' consolidator,
  which assembles one tensor at a time and splits the files across ranks, so memory stays bounded
  whatever the model size.
* ``"auto"`` (default): ``memory`` unless the state holds DTensors (FSDP2/TP), then ``checkpoint``.

Either way the names on disk are the ones ``save_pretrained`` writes: transformers 5 holds some
weights in memory in another layout (a Mixtral or Qwen3-MoE layer's experts fused into
``mlp.experts.gate_up_proj`` and ``down_proj``), and the export reverses the model's conversion
(``ckptio_safetensors.hf_tensors``/``hf_source_view``), one tensor per expert, each a byte range
of the fused one. The conversion comes from the model (``memory``) or from the ``config.json``
written (``checkpoint``, and ``memory`` without a transformers model), so older readers and
``from_pretrained`` read the export as they read a ``save_pretrained`` directory.

Atomicity, through ckptio's commit protocol (:mod:`ckptio.commit`): on ``rename`` backends the
whole directory (metadata files, shards, then the index last) is assembled in a unique staging
directory ``<step>/.consolidated.<token>.ckptio-partial`` and renamed into place in one step, so
a crash leaves the old export or the new one, never a mix; on ``marker`` backends (object stores)
the old index goes first, the metadata and shards follow and the index is written last, so a
directory without ``model.safetensors.index.json`` is incomplete. Being inside the step
directory, it is deleted with the step by retention.

``config.json`` and ``generation_config.json`` come from ``config=`` (a ``PretrainedConfig``, a
dict, or the URL of a ``config.json`` or of a directory holding one, e.g. the base model), else
from the model (``model.config``, ``model.generation_config``), else from the checkpoint's own
``config.json`` artifact, so the directory loads with ``from_pretrained`` as it is. Float weights
are written in ``cast_dtype``, else in the base model's dtype (the ``dtype``/``torch_dtype`` of
``base_model_path``'s or of an explicit or stored config), else as they are in memory; the
written config names that dtype (a model's own config names its weights' dtype, as
``save_pretrained`` does).

Options: ``mode`` (``"every"``, ``"final"`` (default: only the save with ``final=True``, the last
save of a run; ``CheckpointManager.close()`` saves nothing and so never exports), ``"off"``),
``model``/``key`` (default: the ``ckptio.ModelState`` in the state; for a list of pipeline parts
the first part with a ``config``), ``config``, ``generation_config``, ``tokenizer``,
``base_model_path`` (an HF directory, any URL: original per-tensor dtypes are restored from its
headers and, with ``mirror_shards``, its file layout is reused), ``max_shard_size`` (``"5GB"``),
``cast_dtype``, ``subdir`` (``"consolidated"``), ``source``, ``storage_options`` (for reading
``base_model_path``/``config``/the checkpoint by URL).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from ckptio import ext
from ckptio.errors import CheckpointError
from ckptio.ext import (
    AddonContext,
    Backend,
    ModelState,
    Target,
    addon_hook,
    full_tensor,
    open_backend,
    pretrained_files,
)
from torch.distributed.tensor import DTensor

log = logging.getLogger("ckptio.consolidated_hf")

MODES = ("every", "final", "off")
SOURCES = ("auto", "memory", "checkpoint")
INDEX_NAME = "model.safetensors.index.json"
_SCRATCH = "consolidated_hf"


def _normalize_mode(mode: Any) -> str:
    if mode is True:
        return "every"
    if mode is False or mode is None:
        return "off"
    m = str(mode).lower()
    if m not in MODES:
        raise ValueError(f"consolidated-hf: mode={mode!r}; expected one of {MODES}")
    return m


def _read_header_dtypes(backend: Backend, path: str) -> dict[str, torch.dtype]:
    """Per-tensor dtypes from one safetensors file's header (8-byte length, then JSON)."""
    from ckptio_safetensors._header import CODE_TO_DTYPE

    (n,) = torch.frombuffer(bytearray(backend.read_bytes(path, 0, 8)), dtype=torch.int64).tolist()
    header = json.loads(backend.read_bytes(path, 8, n))
    return {
        k: CODE_TO_DTYPE[v["dtype"]]
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] in CODE_TO_DTYPE
    }


def reference_layout(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, torch.dtype], dict[str, Any] | None]:
    """Original dtypes and (if sharded) the index of the base HF model directory at ``url``."""
    u, backend = open_backend(url, storage_options)
    ipath = backend.join(u.path, INDEX_NAME)
    index: dict[str, Any] | None = None
    if backend.exists(ipath):
        index = json.loads(backend.read_bytes(ipath))
        files = sorted(set(index["weight_map"].values()))  # type: ignore[index]
    elif backend.exists(backend.join(u.path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"consolidated-hf: base_model_path {url} has no model.safetensors(.index.json)")
    dtypes: dict[str, torch.dtype] = {}
    for f in files:
        dtypes.update(_read_header_dtypes(backend, backend.join(u.path, f)))
    return dtypes, index


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied ``lm_head``);
    HF files store such a weight once, like ``save_pretrained``."""
    unique = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique


def _main_part(model: Any) -> Any:
    """The module whose config describes the model: the model itself, or for a pipeline-parallel
    list of parts the first one with a ``config``."""
    if isinstance(model, (list, tuple)):
        return next((m for m in model if getattr(m, "config", None) is not None), model[0] if model else None)
    return model


def _conversion_source(model: Any, config_json: bytes | None) -> Any:
    """What gives a memory export its transformers conversion (fused MoE experts in memory, one
    tensor per expert on disk, as ``from_pretrained`` reads them): the model itself when it is a
    transformers model (no copy, and the conversion is the one its weights were loaded with), else
    a model built on the meta device from the ``config.json`` written beside the weights. ``None``
    (names as they are in memory) when neither gives one, with a warning when the config fails."""
    from ckptio_safetensors.conversion import is_transformers_model, model_for

    if is_transformers_model(model):
        return model
    if config_json is None:
        return None
    try:
        return model_for(config_json)
    except Exception as exc:  # no transformers, or a config it cannot build (remote code...)
        log.warning(
            "consolidated-hf: not applying a transformers conversion to the export (%s: %s)",
            type(exc).__name__,
            exc,
        )
        return None


def _save_group(pg: Any) -> Any:
    """The save's process group as an explicit group: ``None`` means the default group when
    torch.distributed is initialised."""
    if pg is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return pg


class ConsolidatedHFAddon:
    """Exports the model as a Hugging Face directory after the commit (see the module docstring)."""

    name = "consolidated-hf"

    def __init__(
        self,
        mode: str | bool = "final",
        *,
        model: torch.nn.Module | None = None,
        key: str | None = None,
        config: Any = None,
        generation_config: Any = None,
        tokenizer: Any = None,
        base_model_path: str | None = None,
        mirror_shards: bool = True,
        max_shard_size: int | str = "5GB",
        cast_dtype: str | torch.dtype | None = None,
        subdir: str = "consolidated",
        source: str = "auto",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.mode = _normalize_mode(mode)
        if source not in SOURCES:
            raise ValueError(f"consolidated-hf: source={source!r}; expected one of {SOURCES}")
        self.model, self.key = model, key
        self.config, self.generation_config, self.tokenizer = config, generation_config, tokenizer
        self.base_model_path, self.mirror_shards = base_model_path, mirror_shards
        self.max_shard_size, self.cast_dtype = max_shard_size, cast_dtype
        self.subdir = subdir.strip("/")
        self.source = source
        self.storage_options = storage_options

    def wanted(self, ctx: AddonContext) -> bool:
        return self.mode == "every" or (self.mode == "final" and ctx.final)

    def _find(self, state: dict[str, Any]) -> tuple[str, torch.nn.Module | None]:
        if self.key is not None:
            v = state.get(self.key)
            return self.key, self.model or (_main_part(v.model) if isinstance(v, ModelState) else None)
        found = [(k, _main_part(v.model)) for k, v in state.items() if isinstance(v, ModelState)]
        if self.model is not None:
            found = [(k, m) for k, m in found if m is self.model] or found
        if len(found) != 1:
            raise CheckpointError(
                f"consolidated-hf: cannot tell which state entry is the model ({[k for k, _ in found]}); "
                "pass ('consolidated-hf', {'key': 'model'})"
            )
        return found[0]

    # -- hooks ---------------------------------------------------------------------------------
    @addon_hook(tryfirst=True)  # capture the in-memory names before other addons rename them
    def transform_state_dict(self, ctx: AddonContext, state_dict: dict[str, Any]) -> None:
        if ctx.op != "save" or not self.wanted(ctx):
            return
        key, model = self._find(ctx.state)
        entry = state_dict.get(key)
        if not isinstance(entry, dict):
            raise CheckpointError(f"consolidated-hf: state entry {key!r} is not a model state dict")
        if model is not None and isinstance(getattr(model, "peft_config", None), dict):
            raise CheckpointError(
                "consolidated-hf exports plain transformers models; for a PEFT model use the 'peft' addon, or "
                "export model.merge_and_unload()"
            )
        state_value = ctx.state.get(key)
        parts = state_value.parts if isinstance(state_value, ModelState) else [model]
        drop = set().union(*(tied_aliases(p) for p in parts if p is not None))
        tensors = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor) and k not in drop}
        ctx.scratch[_SCRATCH] = {"key": key, "model": model, "tensors": tensors}

    def after_commit(self, ctx: AddonContext) -> None:
        job = ctx.scratch.pop(_SCRATCH, None)
        if job is None:
            return
        backend, pg = ctx.backend, ctx.process_group
        dest = backend.join(ctx.path, self.subdir)
        tensors: dict[str, torch.Tensor] = job["tensors"]
        sharded = any(isinstance(t, DTensor) for t in tensors.values())
        source = self.source if self.source != "auto" else ("checkpoint" if sharded else "memory")
        target: Target | None = None

        def prepare() -> tuple[
            str, dict[str, torch.dtype] | None, dict[str, Any] | None, torch.dtype | None, bytes | None
        ]:
            nonlocal target
            # the step is this save's own: an earlier export inside it is replaced, whole
            target = Target.prepare(
                backend, dest, overwrite=True, what=backend.url(dest), replace_foreign=True
            )
            work = target.data_dir
            if work == dest:  # an object store: uncommit the old export before writing over it
                backend.remove(backend.join(dest, INDEX_NAME))
            files, cast = self._metadata_files(ctx, job["model"], tensors)
            for name, data in files.items():
                backend.write_bytes(backend.join(work, name), data)
            # the config written is what gives the export its transformers conversion (below)
            config_json = files.get("config.json")
            if self.base_model_path is None:
                return work, None, None, cast, config_json
            dtypes, index = reference_layout(self.base_model_path, self.storage_options)
            return work, dtypes, (index if self.mirror_shards else None), cast, config_json

        def abort() -> None:
            if target is not None:
                target.abort()

        try:
            shared = ext.on_coordinator(prepare, pg, share_result=True)
        except BaseException:
            abort()
            raise
        assert shared is not None
        work, dtypes, ref_index, cast, config_json = shared
        try:
            if source == "checkpoint":
                self._from_checkpoint(ctx, job["key"], work, ref_index, cast, config_json)
            else:
                conversion = _conversion_source(job["model"], config_json) if ctx.is_coordinator else None
                self._from_memory(ctx, tensors, work, dtypes, ref_index, cast, conversion)
        except BaseException:
            abort()  # only the coordinator holds the target; the failure reached every rank
            raise

        def publish() -> None:
            assert target is not None
            target.commit(None)  # the index is already the last file written; one rename
            log.info("consolidated-hf: wrote %s", backend.url(dest))

        ext.on_coordinator(publish, pg)

    # -- parts ---------------------------------------------------------------------------------
    def _metadata_files(
        self, ctx: AddonContext, model: torch.nn.Module | None, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, bytes], torch.dtype | None]:
        """``config.json``, ``generation_config.json`` and the tokenizer files, and the dtype to
        write float weights in (``None``: as they are).

        The config comes from ``config=`` (a ``PretrainedConfig``, a dict, or the URL of a
        ``config.json`` or of a directory such as the base model's), else from the model, else from
        the checkpoint's own ``config.json`` artifact. The weights are written in ``cast_dtype``,
        else in the base model's dtype (``base_model_path``'s config), else in the dtype an explicit
        or stored config names; a model's own config names the dtype of its weights, as
        ``save_pretrained`` writes it. The config always names the dtype written.
        """
        from ckptio_safetensors.consolidation import (
            CONFIG_NAME,
            GENERATION_CONFIG_NAME,
            export_dtype,
            hf_config_files,
            with_config_dtype,
        )
        from ckptio_safetensors.hf import parse_cast

        files: dict[str, bytes] = {}
        config = self.config if self.config is not None else getattr(model, "config", None)
        own = self.config is None and config is not None
        if isinstance(config, (str, dict)):
            files.update(hf_config_files(config, storage_options=self.storage_options))
        elif config is not None:
            files.update(pretrained_files(config))
            if own:  # the model's config names the weights' own dtype, as save_pretrained writes it
                dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
                files = with_config_dtype(files, dtype) if dtype is not None else files
        else:  # the checkpoint's artifacts (e.g. written by the transformers Trainer integration)
            files.update(hf_config_files(None, ctx.backend.url(ctx.path), self.storage_options))
        if CONFIG_NAME not in files:
            raise CheckpointError(
                "consolidated-hf: no config.json to write; pass config= (a transformers PretrainedConfig, "
                "a config dict, or the path of a config.json or of the base model's directory)"
            )
        gen = self.generation_config
        if gen is None and GENERATION_CONFIG_NAME not in files:
            gen = getattr(model, "generation_config", None)
        if gen is not None:
            files.update(pretrained_files(gen))
        cast, files = export_dtype(
            files, parse_cast(self.cast_dtype), self.base_model_path, self.storage_options, use_config=not own
        )
        if self.tokenizer is not None:
            files.update(pretrained_files(self.tokenizer))
        return files, cast

    def _from_memory(
        self,
        ctx: AddonContext,
        tensors: dict[str, torch.Tensor],
        work: str,
        dtypes: dict[str, torch.dtype] | None,
        ref_index: dict[str, Any] | None,
        cast: torch.dtype | None,
        conversion: Any = None,
    ) -> None:
        """Rank 0 writes the gathered tensors; ``conversion`` (a transformers model, or ``None``:
        names as they are) has its checkpoint conversion reversed on the way, as
        ``save_pretrained`` does, so that fused MoE experts are written one tensor per expert."""
        from ckptio_safetensors import write_hf_checkpoint

        full: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():  # same order on every rank: the gathers pair up
            whole = full_tensor(t, ctx.process_group)
            if ctx.is_coordinator:
                full[name] = whole

        def write() -> None:
            write_hf_checkpoint(
                full,
                ctx.backend,
                work,
                max_shard_size=self.max_shard_size,
                dtypes=dtypes,
                cast_dtype=cast,
                reference_index=ref_index,
                model=conversion,
            )

        ext.on_coordinator(write, ctx.process_group)

    def _from_checkpoint(
        self,
        ctx: AddonContext,
        key: str,
        work: str,
        ref_index: dict[str, Any] | None,
        cast: torch.dtype | None,
        config_json: bytes | None = None,
    ) -> None:
        """Every rank writes its share of the files from the committed checkpoint. The
        conversion to reverse comes from the ``config.json`` this export writes (the addon's
        ``config=``, the model's config or the checkpoint's artifact), not from the live model:
        an asynchronous save runs this while training goes on."""
        from ckptio_safetensors.consolidation import consolidate

        consolidate(
            ctx.backend.url(ctx.path),
            ctx.backend.url(work),
            in_place=True,
            max_shard_size=self.max_shard_size,
            reference_index=ref_index,
            dtype_reference=self.base_model_path,
            cast_dtype=cast,
            # consolidate() reads None as "this process alone"; the save's None is the default group,
            # whose ranks split the files between them (each would otherwise write the whole export)
            process_group=_save_group(ctx.process_group),
            progress=False,
            group=key,
            storage_options=self.storage_options,
            conversion=config_json,
        )
