"""The learning-rate schedule: a pure function of the step, so a resumed run continues it exactly."""

from __future__ import annotations

import math

from ..config.settings import TrainSettings


def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `lr`, then cosine to 0 or constant.

    The cosine is evaluated at (step - warmup - 1) / (max_steps - warmup), so no step runs at lr 0.
    """
    if s.warmup_steps and step <= s.warmup_steps:
        return s.lr * step / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    progress = (step - s.warmup_steps - 1) / max(1, s.max_steps - s.warmup_steps)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
