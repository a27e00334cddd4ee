"""``CkptioTrainer``: a ``transformers.Trainer`` whose checkpoints go through ckptio.

A Trainer checkpoint becomes one step of a :class:`ckptio.CheckpointManager` rooted at the
trainer's URL (``ckptio_url``, default ``args.output_dir``): HF's ``checkpoint-<step>`` is ckptio's
``<root>/step_<step:08d>``, written atomically on any backend. The step holds

* ``model``: the model's weights (a PEFT model: only the adapter, through ckptio's ``peft`` addon
  when ``ckptio-peft`` is installed, which also writes ``adapter_model.safetensors`` and
  ``adapter_config.json``),
* ``optimizer``: optimizer and learning-rate scheduler, keyed by parameter names,
* ``scaler``: the AMP gradient scaler, when there is one,
* ``rng``: Python, NumPy, torch CPU and CUDA generators, per rank,
* ``trainer_state``: the ``TrainerState`` JSON (also written as ``trainer_state.json``, next to the
  tokenizer/processor files and the model's ``config.json``, as the Trainer writes them).

``save_total_limit`` becomes the manager's retention (:class:`~ckptio_transformers.TrainerRetention`).

The Trainer has no public hook that replaces its checkpoint writing (``TrainerCallback.on_save``
runs after the Trainer has written its own), so these private methods are overridden; the
installed transformers is checked against :data:`~ckptio_transformers.SUPPORTED_TRANSFORMERS` and
their signatures when a trainer is built:

* ``_save_checkpoint``: saves the step through the manager instead of writing files.
* ``_load_from_checkpoint``: loads the model weights from the step.
* ``_load_optimizer_and_scheduler``: loads optimizer, scheduler (and scaler).
* ``_load_rng_state``: sets the generators read from the step, at the moment the Trainer does.
* ``_load_best_model``: ``load_best_model_at_end`` loads the best step's weights.

``train()`` (public) resolves ``resume_from_checkpoint`` to a step, reads the trainer state and the
generators, and hands the Trainer a local directory holding only ``trainer_state.json``, which
its resume logic reads by path. A callback (``on_train_begin``/``on_evaluate``) restores
``state.best_model_checkpoint`` after resuming and records evaluation metrics into the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ckptio
import torch
from ckptio.errors import CheckpointError, CheckpointNotFoundError, StateMismatchError
from ckptio.ext import AddonContext, pretrained_files
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, get_last_checkpoint

from .compat import check_transformers_version
from .retention import KeepStep, TrainerRetention
from .rng import TrainerRNG

log = logging.getLogger("ckptio.transformers")

TRAINER_STATE_NAME = "trainer_state.json"
#: The manifest metadata key this integration writes (``manifest.metadata["transformers"]``).
METADATA_KEY = "transformers"
_HF_STEP = re.compile(rf"^(?:.*[/\\])?{PREFIX_CHECKPOINT_DIR}-(\d+)[/\\]?$")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CkptioSettings:
    """Where and how a trainer's checkpoints are saved (the ``ckptio_*`` arguments)."""

    #: Root URL of the run's checkpoints (path, ``s3://``, ``gs://``, ``msc://``...); ``None``:
    #: ``args.output_dir``.
    url: str | None = None
    storage_options: dict[str, Any] | None = None
    async_save: bool = False
    #: Extra addons for every save and load (``"consolidated-hf"``, objects...).
    addons: Sequence[Any] = ()
    #: Replaces the ``save_total_limit`` mapping (the best step stays protected).
    retention: ckptio.RetentionPolicy | None = None
    takeover: bool = False


@dataclass
class _Source:
    """The checkpoint a ``train()`` call resumes from."""

    url: str
    manifest: ckptio.Manifest
    #: This trainer's manager when the step is one of its run's steps (then loads go through it).
    manager: ckptio.CheckpointManager | None = None
    step: int | None = None
    entries: set[str] = field(default_factory=set)
    rng: TrainerRNG | None = None


class _TrainerFiles:
    """Addon writing the Trainer's side files (``trainer_state.json``, tokenizer, config) into
    the step before its commit, so they are covered by the manifest on any backend."""

    name = "transformers-trainer"

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, bytes]] = {}

    def on_tensors_written(self, ctx: AddonContext) -> None:
        if ctx.op != "save" or ctx.step is None:
            return
        files = self.pending.pop(ctx.step, None)
        if files and ctx.is_coordinator:
            for name, data in files.items():
                ctx.write_bytes(name, data)


class _CkptioCallback(TrainerCallback):
    """Public-hook half of the integration: best checkpoint after resume, evaluation metrics."""

    def __init__(self, trainer: CkptioTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        best, self.trainer._ckptio_restore_best = self.trainer._ckptio_restore_best, None
        if best is not None:
            state.best_model_checkpoint = best

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if isinstance(metrics, dict):
            numeric = {
                str(k): float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            }
            self.trainer._ckptio_eval = (int(state.global_step), numeric)


def _is_peft(model: Any) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict)


def _adapter_name(model: Any) -> str:
    name = getattr(model, "active_adapter", None)
    return name if isinstance(name, str) else "default"


def _addon_name(spec: Any) -> str | None:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        return spec[0]
    return getattr(spec, "name", None)


def _inner_optimizer(opt: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _peft_addon_installed() -> bool:
    return any("peft" in p.addons for p in ckptio.list_plugins() if p.error is None and not p.skipped)


def _entries(manifest: ckptio.Manifest) -> set[str] | None:
    """The state entries a step written by this integration holds (``None``: not one of ours)."""
    meta = getattr(manifest, "metadata", None)
    info = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    entries = info.get("entries") if isinstance(info, dict) else None
    return {str(e) for e in entries} if isinstance(entries, list) else None


if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class CkptioTrainerMixin(_TrainerBase):
    """Mix into any ``Trainer`` subclass (before it) to save and resume through ckptio::

        class MyTrainer(CkptioTrainerMixin, SFTTrainer): ...
        trainer = MyTrainer(..., ckptio_url="s3://bucket/run")

    Keyword arguments (all optional): ``ckptio_url`` (default ``args.output_dir``),
    ``ckptio_storage_options``, ``ckptio_async_save``, ``ckptio_addons``, ``ckptio_retention``,
    ``ckptio_takeover`` (see :class:`CkptioSettings`). :func:`enable` does the same to a trainer
    that already exists.
    """

    _ckptio: CkptioSettings
    _ckptio_managers: dict[str, ckptio.CheckpointManager]
    _ckptio_source: _Source | None
    _ckptio_files: _TrainerFiles
    _ckptio_eval: tuple[int, dict[str, float]] | None
    _ckptio_restore_best: str | None
    _ckptio_committed: dict[str, bool]
    _ckptio_peft_fallback: bool

    def __init__(
        self,
        *args: Any,
        ckptio_url: str | os.PathLike[str] | None = None,
        ckptio_storage_options: dict[str, Any] | None = None,
        ckptio_async_save: bool = False,
        ckptio_addons: Sequence[Any] = (),
        ckptio_retention: ckptio.RetentionPolicy | None = None,
        ckptio_takeover: bool = False,
        **kwargs: Any,
    ) -> None:
        check_transformers_version()  # before building anything
        super().__init__(*args, **kwargs)
        self._ckptio_setup(
            CkptioSettings(
                url=os.fspath(ckptio_url) if ckptio_url is not None else None,
                storage_options=ckptio_storage_options,
                async_save=ckptio_async_save,
                addons=tuple(ckptio_addons),
                retention=ckptio_retention,
                takeover=ckptio_takeover,
            )
        )

    def _ckptio_setup(self, settings: CkptioSettings) -> None:
        check_transformers_version()
        if getattr(self, "is_deepspeed_enabled", False):
            raise CheckpointError(
                "ckptio-transformers does not support DeepSpeed (its engine writes its own checkpoints); "
                "use the plain Trainer, DDP or FSDP"
            )
        self._ckptio = settings
        self._ckptio_managers = {}
        self._ckptio_source = None
        self._ckptio_files = _TrainerFiles()
        self._ckptio_eval = None
        self._ckptio_restore_best = None
        self._ckptio_committed = {}
        self._ckptio_peft_fallback = False
        if not any(isinstance(cb, _CkptioCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(_CkptioCallback(self))

    # -- the run's manager ----------------------------------------------------------------------
    @property
    def checkpoint_url(self) -> str:
        """The root URL of this run's checkpoints."""
        return self._ckptio_root(None)

    @property
    def checkpoint_manager(self) -> ckptio.CheckpointManager:
        """The :class:`ckptio.CheckpointManager` of this run (``steps()``, ``latest_step()``...).

        ``train()`` closes it when it returns (releasing the run lock); the next use opens a new one.
        """
        return self._ckptio_manager(None)

    def _ckptio_root(self, trial: Any) -> str:
        base = self._ckptio.url if self._ckptio.url is not None else self.args.output_dir
        if trial is not None and self.hp_search_backend is not None:  # one series per trial
            run = os.path.relpath(self._get_output_dir(trial), self.args.output_dir)
            if run not in ("", "."):
                return str(ckptio.parse_url(base).join(run.replace(os.sep, "/")))
        return str(base)

    def _ckptio_addons(self) -> list[Any]:
        addons = list(self._ckptio.addons)
        if _is_peft(self.model) and "peft" not in {_addon_name(a) for a in addons}:
            if _peft_addon_installed():
                addons.append(("peft", {"adapter_name": _adapter_name(self.model)}))
            elif not self._ckptio_peft_fallback:
                self._ckptio_peft_fallback = True
                log.warning(
                    "ckptio-peft is not installed: checkpoints hold the whole PEFT model, base weights "
                    "included (pip install ckptio-peft to save only the adapter, in PEFT's format)"
                )
        return addons

    def _ckptio_manager(self, trial: Any) -> ckptio.CheckpointManager:
        root = self._ckptio_root(trial)
        mgr = self._ckptio_managers.get(root)
        if mgr is None:
            policy = TrainerRetention.for_trainer(self)
            retention: ckptio.RetentionPolicy = (
                policy
                if self._ckptio.retention is None
                else self._ckptio.retention | KeepStep(policy.best_step)
            )
            mgr = ckptio.CheckpointManager(
                root,
                retention=retention,
                async_save=self._ckptio.async_save,
                addons=[*self._ckptio_addons(), self._ckptio_files],
                storage_options=self._ckptio.storage_options,
                takeover=self._ckptio.takeover,
            )
            self._ckptio_managers[root] = mgr
        return mgr

    def _ckptio_close(self, raise_errors: bool = True) -> None:
        """Wait for background saves and release the run lock (end of ``train()``)."""
        managers, self._ckptio_managers = self._ckptio_managers, {}
        first: BaseException | None = None
        for mgr in managers.values():
            try:
                mgr.close()
            except Exception as exc:
                first = first or exc
                log.warning("closing the checkpoint manager of %s: %s", mgr.root, exc)
        if first is not None and raise_errors:
            raise first

    def _ckptio_exists(self, url: str) -> bool:
        """Whether ``url`` is a committed ckptio checkpoint (cached: one manifest read per URL)."""
        if url not in self._ckptio_committed:
            try:
                ckptio.manifest(url, storage_options=self._ckptio.storage_options)
                self._ckptio_committed[url] = True
            except CheckpointError:
                return False  # not cached: it may be committed later
        return self._ckptio_committed[url]

    def _ckptio_model(self) -> torch.nn.Module:
        if not isinstance(self.model, torch.nn.Module):
            raise CheckpointError("the trainer has no model to save or load")
        return self.model

    # -- save -----------------------------------------------------------------------------------
    def _ckptio_side_files(self, trainer_json: str) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        processor = self.processing_class
        if processor is not None and callable(getattr(processor, "save_pretrained", None)):
            files.update(pretrained_files(processor))
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        if not _is_peft(model) and callable(getattr(config, "save_pretrained", None)):
            files.update(pretrained_files(config))
        files[TRAINER_STATE_NAME] = trainer_json.encode()
        return files

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, as one step of the run's ckptio series (replaces its files)."""
        step = int(self.state.global_step)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        mgr = self._ckptio_manager(trial)

        if (
            self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best = int(self.state.best_global_step)
            best_url = str(mgr.url_of(best))
            if best == step or self._ckptio_exists(best_url):
                self.state.best_model_checkpoint = best_url

        if self.args.should_save:  # as the Trainer does before writing trainer_state.json
            stateful: Any = self.state.stateful_callbacks
            for cb in [
                cb
                for cb in self.callback_handler.callbacks + [self.control]
                if isinstance(cb, ExportableState)
            ]:
                cb_name = cb.__class__.__name__
                cb_state = cb.state()
                if isinstance(stateful[cb_name], list):
                    stateful[cb_name].append(cb_state)
                else:
                    stateful[cb_name] = cb_state

        model_ = self._ckptio_model()
        state: dict[str, Any] = {"model": ckptio.ModelState(model_)}
        if not self.args.save_only_model:
            state["optimizer"] = ckptio.OptimizerState(
                model_, _inner_optimizer(self.optimizer), self.lr_scheduler
            )
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            state["rng"] = ckptio.PerRank(TrainerRNG())
        trainer_json = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        state["trainer_state"] = trainer_json
        if self.args.should_save:
            self._ckptio_files.pending[step] = self._ckptio_side_files(trainer_json)
        import transformers

        metadata = {
            METADATA_KEY: {
                "global_step": step,
                "name": f"{PREFIX_CHECKPOINT_DIR}-{step}",
                "entries": sorted(state),
                "transformers_version": str(transformers.__version__),
                "peft": _is_peft(self.model),
            }
        }
        evaluated = self._ckptio_eval
        metrics = evaluated[1] if evaluated is not None and evaluated[0] == step else None
        mgr.save(step, state, metrics=metrics or None, metadata=metadata)

    # -- resume ---------------------------------------------------------------------------------
    def train(  # type: ignore[override]
        self,
        resume_from_checkpoint: str | bool | int | os.PathLike[str] | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``, resuming from ckptio checkpoints.

        ``resume_from_checkpoint``: ``True`` resumes from the run's newest committed step and
        raises :class:`ckptio.CheckpointNotFoundError` when there is none; a step number or HF's
        ``"checkpoint-<step>"`` name picks one of the run's steps; a URL names a checkpoint (or a
        run, whose newest step is taken) anywhere; the path of a checkpoint the stock Trainer
        wrote is loaded the Trainer's way. Checkpoints of this call go to the run's root.
        """
        try:
            source = self._ckptio_resolve(resume_from_checkpoint, trial)
            if not isinstance(source, _Source):
                output = super().train(source, trial, ignore_keys_for_eval, **kwargs)
            else:
                with tempfile.TemporaryDirectory(prefix="ckptio-transformers-") as staged:
                    self._ckptio_begin_resume(source, staged)
                    output = super().train(staged, trial, ignore_keys_for_eval, **kwargs)
        except BaseException:
            self._ckptio_source = None
            self._ckptio_close(raise_errors=False)
            raise
        self._ckptio_source = None
        self._ckptio_close()
        return output

    def _ckptio_step_source(self, mgr: ckptio.CheckpointManager, step: int) -> _Source:
        url = str(mgr.url_of(step))
        try:
            manifest = ckptio.manifest(url, storage_options=self._ckptio.storage_options)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} ({PREFIX_CHECKPOINT_DIR}-{step}) at {url}; "
                f"committed steps under {mgr.root}: {mgr.steps()}"
            ) from exc
        return _Source(url=url, manifest=manifest, manager=mgr, step=step)

    def _ckptio_resolve(self, arg: Any, trial: Any) -> _Source | str | None:
        """``resume_from_checkpoint`` -> a ckptio step, a stock Trainer directory, or ``None``."""
        if arg is None or arg is False:
            return None
        mgr = self._ckptio_manager(trial)
        if arg is True:
            step = mgr.latest_step()
            if step is None:
                hint = ""
                out = str(self.args.output_dir)
                native = get_last_checkpoint(out) if os.path.isdir(out) else None
                if native:
                    hint = f" ({native} is a checkpoint of the stock Trainer: pass its path to start from it)"
                raise CheckpointNotFoundError(
                    f"resume_from_checkpoint=True, but there is no checkpoint at {mgr.root}: no committed "
                    "step to resume from. For a first run call train() without resume_from_checkpoint, or "
                    "pass resume_from_checkpoint=trainer.checkpoint_manager.latest_step() is not None to "
                    f"resume only when a checkpoint exists{hint}"
                )
            return self._ckptio_step_source(mgr, step)
        if isinstance(arg, int):
            return self._ckptio_step_source(mgr, arg)
        if isinstance(arg, os.PathLike):
            arg = os.fspath(arg)
        if not isinstance(arg, str):
            raise TypeError(f"resume_from_checkpoint={arg!r}: expected a bool, a step, a name or a URL")
        if (
            "://" not in arg
            and os.path.isfile(os.path.join(arg, TRAINER_STATE_NAME))
            and not os.path.exists(os.path.join(arg, "manifest.json"))
        ):
            return arg  # written by the stock Trainer: its own loading code reads it
        hf = _HF_STEP.match(arg)
        if hf:
            return self._ckptio_step_source(mgr, int(hf.group(1)))
        url = ckptio.parse_url(arg)
        own = _STEP_DIR.match(url.name)
        if own and str(url.parent) == str(mgr.root):
            return self._ckptio_step_source(mgr, int(own.group(1)))
        try:
            return _Source(
                url=str(url), manifest=ckptio.manifest(arg, storage_options=self._ckptio.storage_options)
            )
        except CheckpointNotFoundError:
            pass
        # not a checkpoint: the root of a run, whose newest step is taken
        with ckptio.CheckpointManager(arg, storage_options=self._ckptio.storage_options) as other:
            step = other.latest_step()
            same_run = str(other.root) == str(mgr.root)
            step_url = str(other.url_of(step)) if step is not None else None
        if step is None or step_url is None:
            raise CheckpointNotFoundError(
                f"resume_from_checkpoint={arg!r}: there is no checkpoint there (neither a committed "
                "checkpoint nor a run with committed steps)"
            )
        if same_run:
            return self._ckptio_step_source(mgr, step)
        return _Source(
            url=step_url, manifest=ckptio.manifest(step_url, storage_options=self._ckptio.storage_options)
        )

    def _ckptio_read(self, state: dict[str, Any], what: str, optional: tuple[str, ...] = ()) -> None:
        """Load ``state`` (a subset of the step's entries) from the checkpoint being resumed."""
        src = self._ckptio_source
        assert src is not None
        if src.manager is not None and src.step is not None:
            result = src.manager.load(state, src.step, strict=False)
        else:
            result = ckptio.load(
                state,
                src.url,
                strict=False,
                addons=self._ckptio_addons(),
                storage_options=self._ckptio.storage_options,
            )
        missing = [k for k in result.missing if not k.startswith(optional)]
        if missing:
            raise StateMismatchError(
                f"the checkpoint at {src.url} does not hold the trainer's {what}: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} (was it saved from another model or optimizer setup?)",
                missing=missing,
            )

    def _ckptio_begin_resume(self, source: _Source, staged: str) -> None:
        """Read the trainer state and generators; stage ``trainer_state.json`` for the Trainer."""
        entries = _entries(source.manifest)
        if entries is None or "trainer_state" not in entries:
            raise CheckpointError(
                f"{source.url} is a ckptio checkpoint, but not one a Trainer wrote through ckptio-transformers "
                f"(its manifest has no {METADATA_KEY!r} metadata): nothing to resume a Trainer from"
            )
        source.entries = entries
        self._ckptio_source = source
        state: dict[str, Any] = {"trainer_state": ""}
        if "rng" in entries:
            source.rng = TrainerRNG()
            state["rng"] = ckptio.PerRank(source.rng)
        self._ckptio_read(state, "trainer state", optional=("rng",))
        text = state["trainer_state"]
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise StateMismatchError(f"the trainer state in {source.url} is not JSON: {exc}") from exc
        # the Trainer forgets a best checkpoint that is not a local directory: keep it, put it back
        # once training begins (on_train_begin), if it is still there
        best = data.get("best_model_checkpoint")
        self._ckptio_restore_best = None
        if isinstance(best, str):
            if self._ckptio_exists(best) or os.path.isdir(best):
                self._ckptio_restore_best = best
            else:
                log.warning("the best checkpoint %s recorded in %s is gone; ignoring it", best, source.url)
            data["best_model_checkpoint"] = None
        with open(os.path.join(staged, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        log.info("resuming from %s (global step %s)", source.url, data.get("global_step"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._ckptio_source is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = model if model is not None else self._ckptio_model()
        self._ckptio_read({"model": ckptio.ModelState(target)}, "model weights")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        src = self._ckptio_source
        if src is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if "optimizer" not in src.entries:
            log.info(
                "%s holds no optimizer state (save_only_model=True): the optimizer starts afresh", src.url
            )
            return
        state: dict[str, Any] = {
            "optimizer": ckptio.OptimizerState(
                self._ckptio_model(), _inner_optimizer(self.optimizer), self.lr_scheduler
            )
        }
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in src.entries:
            state["scaler"] = scaler
        self._ckptio_read(state, "optimizer and scheduler state")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        src = self._ckptio_source
        if src is None:
            return super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        if src.rng is None or not src.rng.apply():
            log.info("%s holds no random state for this process: the resumed run may differ", src.url)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._ckptio_exists(best):
            return super()._load_best_model()
        log.info("loading the best model from %s (score: %s)", best, self.state.best_metric)
        result = ckptio.load(
            {"model": ckptio.ModelState(self._ckptio_model())},
            best,
            strict=False,
            addons=self._ckptio_addons(),
            storage_options=self._ckptio.storage_options,
        )
        missing = list(result.missing)
        if missing:
            raise StateMismatchError(
                f"the best checkpoint {best} does not hold the model's weights: missing {missing[:10]}",
                missing=missing,
            )


class CkptioTrainer(CkptioTrainerMixin, Trainer):
    """``transformers.Trainer`` saving and resuming through ckptio.

    ::

        trainer = CkptioTrainer(model=model, args=args, train_dataset=ds, ckptio_url="s3://bucket/run")
        trainer.train(resume_from_checkpoint=True)
    """


_MIXED: dict[type, type] = {}


def enable(
    trainer: Trainer,
    url: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    async_save: bool = False,
    addons: Sequence[Any] = (),
    retention: ckptio.RetentionPolicy | None = None,
    takeover: bool = False,
) -> Trainer:
    """Make an existing trainer (any ``Trainer`` subclass) save and resume through ckptio.

    Its class becomes a subclass with :class:`CkptioTrainerMixin` mixed in; returns the trainer.
    ``url`` defaults to ``args.output_dir``; the other arguments are :class:`CkptioSettings`'.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"enable() takes a transformers.Trainer, not {type(trainer).__name__}")
    check_transformers_version()
    if isinstance(trainer, CkptioTrainerMixin):
        trainer._ckptio_close()
    else:
        cls = type(trainer)
        mixed = _MIXED.get(cls)
        if mixed is None:
            mixed = type(f"Ckptio{cls.__name__}", (CkptioTrainerMixin, cls), {"__module__": cls.__module__})
            _MIXED[cls] = mixed
        trainer.__class__ = mixed
    assert isinstance(trainer, CkptioTrainerMixin)
    trainer._ckptio_setup(
        CkptioSettings(
            url=os.fspath(url) if url is not None else None,
            storage_options=storage_options,
            async_save=async_save,
            addons=tuple(addons),
            retention=retention,
            takeover=takeover,
        )
    )
    return trainer
