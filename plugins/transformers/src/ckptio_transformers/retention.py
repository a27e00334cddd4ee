"""``save_total_limit`` as a ckptio retention policy.

The Trainer's rule (``transformers.trainer_utils.rotate_checkpoints``): keep the ``limit`` newest
checkpoints, but never delete the newest one nor the best one (``state.best_global_step``, set
when ``metric_for_best_model`` is); when the best is older than the ``limit`` newest, it is kept
with the ``limit - 1`` newest (at least the newest). Without a best step this is
``ckptio.KeepLatest(limit)``; without a limit everything is kept.

The manager adds its own guarantees on top: the newest committed step and the step the run
resumed from are never deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ckptio


class TrainerRetention(ckptio.RetentionPolicy):
    """Keep what ``save_total_limit`` keeps in a Trainer's output directory.

    :param limit: returns ``args.save_total_limit`` (read at every save, ``None``/``<= 0``: keep all).
    :param best_step: returns the best step to protect, or ``None``.
    """

    def __init__(self, limit: Callable[[], int | None], best_step: Callable[[], int | None]) -> None:
        self.limit = limit
        self.best_step = best_step

    @classmethod
    def for_trainer(cls, trainer: Any) -> TrainerRetention:
        def best() -> int | None:
            if trainer.args.metric_for_best_model is None:
                return None
            step = trainer.state.best_global_step
            return int(step) if step else None

        return cls(lambda: trainer.args.save_total_limit, best)

    def keep(self, steps: Sequence[Any]) -> set[int]:
        limit = self.limit()
        if limit is None or limit <= 0:
            return {s.step for s in steps}
        latest = ckptio.KeepLatest(limit).keep(steps)
        best = self.best_step()
        if best is None or best in latest or best not in {s.step for s in steps}:
            return latest
        return {best} | ckptio.KeepLatest(max(limit - 1, 1)).keep(steps)


class KeepStep(ckptio.RetentionPolicy):
    """Keep one step chosen at save time (the Trainer's best), if it exists."""

    def __init__(self, step: Callable[[], int | None]) -> None:
        self.step = step

    def keep(self, steps: Sequence[Any]) -> set[int]:
        chosen = self.step()
        return {s.step for s in steps if s.step == chosen}
