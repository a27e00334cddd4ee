"""Retention policies: which committed steps to keep.

Each policy answers one question, "which of these steps do you want kept?"; a manager keeps the
union of what its policies want, plus, always, the newest committed step and the step the run
resumed from. Combine policies with ``|``::

    KeepLatest(3) | KeepBest(2, "val_loss") | KeepEvery(1000)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepInfo:
    """A committed step as retention sees it."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class RetentionPolicy:
    """Base class: override :meth:`keep`."""

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        raise NotImplementedError

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        return AnyOf((self, other))


@dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keep what any of the policies keeps."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        kept: set[int] = set()
        for p in self.policies:
            kept |= p.keep(steps)
        return kept


@dataclass(frozen=True)
class KeepLatest(RetentionPolicy):
    """Keep the ``n`` highest steps."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"KeepLatest(n={self.n!r}): n must be an integer >= 1")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {s.step for s in sorted(steps, key=lambda s: s.step)[-self.n :]}


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keep the ``n`` steps with the best value of ``metric`` (``mode`` "min" or "max").

    Steps without the metric, or with a NaN/inf value, never count as best.
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"KeepBest(n={self.n!r}): n must be an integer >= 1")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest(mode={self.mode!r}): mode must be 'min' or 'max'")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        scored = [
            (float(s.metrics[self.metric]), s.step)
            for s in steps
            if isinstance(s.metrics.get(self.metric), (int, float)) and math.isfinite(s.metrics[self.metric])
        ]
        scored.sort(key=lambda x: (x[0] if self.mode == "min" else -x[0], -x[1]))
        return {step for _, step in scored[: self.n]}


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Keep every step divisible by ``n`` (e.g. permanent snapshots every 1000 steps)."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"KeepEvery(n={self.n!r}): n must be an integer >= 1")

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {s.step for s in steps if s.step % self.n == 0}


@dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    """Keep everything (the default)."""

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {s.step for s in steps}
