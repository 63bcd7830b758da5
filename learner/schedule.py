"""Learning-rate schedules by name: a multiplier of the base learning rate per optimizer step. Pure."""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """lr(step) / lr: linear warmup 0 -> 1 over `warmup_steps`, then `schedule` down to `min_ratio` over `decay_steps`.

    warmup:   (step + 1) / warmup_steps            for step < warmup_steps
    constant: 1
    linear:   1 - (1 - m) p                        p = min(1, (step - warmup_steps) / decay_steps)
    cosine:   m + (1 - m) (1 + cos(pi p)) / 2
    decay_steps = 0 keeps the rate at 1 after warmup (any schedule).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return 1.0
    p = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
