"""The learning-rate schedule: a linear warmup, then either a cosine decay over the whole run or warmup-stable-decay
(WSD: the peak until the run's last stretch, then a linear decay), as a fraction of the optimizer's peak rate.

A cosine's every step depends on the run's length, so a cosine run cannot be made longer without a jump in its
rate. WSD's stable phase does not: a WSD run extends with a larger --max-steps, and a cooled-down run can branch
from any checkpoint of its stable phase (train's --cooldown-from). Recipes that train for months use it for that
(MiniCPM, SmolLM2, DeepSeek).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

Kind = Literal["cosine", "wsd"]
KINDS: tuple[Kind, ...] = ("cosine", "wsd")
DEFAULT: Kind = "wsd"  # 1.1% lower validation loss than cosine at equal tokens (docs/QUALITY.md), and it extends


@dataclass(frozen=True)
class Schedule:
    kind: Kind
    warmup_steps: int
    max_steps: int
    min_ratio: float
    decay_steps: int  # WSD: the decay's length, ending at max_steps (cosine: the whole run after the warmup)

    def ratio(self, step: int) -> float:
        """The fraction of the peak at optimizer step `step` (0 for the first update)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_start = self.max_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, self.decay_steps))
        if self.kind == "wsd":
            return 1 - (1 - self.min_ratio) * progress
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def as_lambda(self) -> partial[float]:
        """For LambdaLR. A partial of a function, not a bound method: LambdaLR checkpoints a callable object's
        __dict__ and would restore the old schedule over the new one when a run resumes with another."""
        return partial(_ratio, self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(schedule: Schedule, step: int) -> float:
    return schedule.ratio(step)


def make(kind: Kind, max_steps: int, warmup_steps: int | None, min_ratio: float, decay: float) -> Schedule:
    """A schedule from train's options: the warmup defaults to 5% of the run; WSD's `decay` is a fraction of the
    run below 1, else a number of steps."""
    if kind not in KINDS:
        raise ValueError(f"schedule {kind!r}: one of {', '.join(KINDS)}")
    warmup = warmup_steps if warmup_steps is not None else max(1, max_steps // 20)
    if kind == "cosine":
        decay_steps = max(0, max_steps - warmup)
    else:
        decay_steps = round(decay * max_steps) if decay < 1 else int(decay)
        decay_steps = min(decay_steps, max(0, max_steps - warmup))
    return Schedule(kind, warmup, max_steps, min_ratio, decay_steps)


def cooldown_length(decay: float, from_step: int) -> int:
    """The steps of a decay branched from `from_step`: `decay` steps, or, below 1, that fraction of the branch's
    whole length (so that --decay 0.2 decays over the last fifth of it, as in a run planned that long)."""
    return int(decay) if decay >= 1 else max(1, round(decay * from_step / (1 - decay)))


def from_json(values: dict[str, Any]) -> Schedule:
    return Schedule(**values)
