"""Learning-rate schedules by name: a multiplier of the base learning rate per optimizer step. Pure."""
from __future__ import annotations

import math
from typing import Callable

from protocol.registry import lookup


def constant(p: float, m: float) -> float:
    """1."""
    return 1.0


def linear(p: float, m: float) -> float:
    """1 - (1 - m) p."""
    return 1.0 - (1.0 - m) * p


def cosine(p: float, m: float) -> float:
    """m + (1 - m) (1 + cos(pi p)) / 2."""
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {"constant": constant, "linear": linear, "cosine": cosine}
"""Decay after warmup by name: f(p, m) with p in [0, 1] the progress through the decay, m the final ratio."""


def lr_factor(step: int, *, schedule: str, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """lr(step) / lr: linear warmup 0 -> 1 over `warmup_steps`, then `schedule` down to `min_ratio` over `decay_steps`.

    warmup:   (step + 1) / warmup_steps            for step < warmup_steps
    after:    LR_SCHEDULES[schedule](p, min_ratio)  p = min(1, (step - warmup_steps) / decay_steps)
    decay_steps = 0 keeps the rate at 1 after warmup (any schedule).
    """
    decay = lookup("lr schedule", LR_SCHEDULES, schedule)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= 0:
        return 1.0
    return decay(min(1.0, (step - warmup_steps) / decay_steps), min_ratio)
