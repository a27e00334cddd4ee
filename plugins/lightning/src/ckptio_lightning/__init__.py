"""ckptio-lightning: write every Lightning checkpoint through ckptio.

::

    from lightning.pytorch import Trainer
    from ckptio_lightning import CkptioCheckpointIO, CkptioModelCheckpoint

    trainer = Trainer(plugins=[CkptioCheckpointIO()],
                      callbacks=[CkptioModelCheckpoint(dirpath="s3://bucket/run", save_last=True)])
    trainer.fit(model, ckpt_path="last")

Each ``.ckpt`` path Lightning passes becomes a ckptio checkpoint directory of that name (local,
``s3://``, ``gs://``, ``az://``, ``msc://``), saved atomically with checksums, non-tensor values
as JSON, never pickled. See ``docs/lightning.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptio.ext import lazy_exports

if TYPE_CHECKING:  # imported on first use: the entry point (``.plugin``) must not load Lightning
    from .callbacks import CkptioModelCheckpoint
    from .checkpoint_io import CkptioCheckpointIO
    from .version import SUPPORTED_LIGHTNING, check_version

_EXPORTS = {
    "CkptioCheckpointIO": ".checkpoint_io",
    "CkptioModelCheckpoint": ".callbacks",
    "SUPPORTED_LIGHTNING": ".version",
    "check_version": ".version",
}
__all__ = ["SUPPORTED_LIGHTNING", "CkptioCheckpointIO", "CkptioModelCheckpoint", "check_version"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
