"""Per-token uncertainty computed from an engine's top-k logprobs (stored with each rollout)."""
from __future__ import annotations

import numpy as np


def entropy_from_topk(topk_logprobs: list[float]) -> float:
    """H ~= -sum_{i<=k} p_i log p_i - r log r,   r = 1 - sum_{i<=k} p_i.

    The mass outside the top-k is counted as one bucket, so this is a lower
    bound on the true entropy that is exact when k covers the support.
    """
    p = np.exp(np.asarray(topk_logprobs, dtype=np.float64))
    h = float(-(p * np.log(np.clip(p, 1e-30, None))).sum())
    rest = max(0.0, 1.0 - float(p.sum()))
    if rest > 1e-12:
        h -= rest * np.log(rest)
    return h
