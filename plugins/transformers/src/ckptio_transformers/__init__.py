"""ckptio-transformers: Hugging Face ``Trainer`` checkpoints through ckptio, on any storage.

Three changed lines in a Trainer script::

    from ckptio_transformers import CkptioTrainer
    trainer = CkptioTrainer(model=model, args=args, train_dataset=ds, ckptio_url="s3://bucket/run")
    trainer.train(resume_from_checkpoint=True)        # True: the run's newest step (an error if none)

or, for a trainer built elsewhere (any ``Trainer`` subclass)::

    trainer = ckptio_transformers.enable(trainer, "s3://bucket/run")

See ``docs/transformers.md`` for what a checkpoint holds and which private Trainer methods are
overridden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

from .compat import SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS

if TYPE_CHECKING:  # the names below are imported on first use (transformers is a heavy import)
    from .compat import TransformersVersionError, check_transformers_version
    from .retention import KeepStep, TrainerRetention
    from .rng import TrainerRNG
    from .trainer import CkptioSettings, CkptioTrainer, CkptioTrainerMixin, enable

_EXPORTS = {
    "CkptioSettings": ".trainer",
    "CkptioTrainer": ".trainer",
    "CkptioTrainerMixin": ".trainer",
    "check_transformers_version": ".compat",
    "enable": ".trainer",
    "KeepStep": ".retention",
    "TrainerRetention": ".retention",
    "TrainerRNG": ".rng",
    "TransformersVersionError": ".compat",
}
__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "CkptioSettings",
    "CkptioTrainer",
    "CkptioTrainerMixin",
    "KeepStep",
    "TrainerRNG",
    "TrainerRetention",
    "TransformersVersionError",
    "check_transformers_version",
    "enable",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
