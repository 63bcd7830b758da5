"""Branch-point scorers: arrays of per-position observations in, scores out (higher = branch first).

Each candidate position t of a stored continuation carries what the model
showed when it sampled token y_t from the prefix y_<t, and the outcome
statistics of that prefix. Scorers are selected by name from SCORERS.

The seed paper's hard instance warns that the model can be *most* uncertain
exactly where it is lost (after a wrong turn the distribution is near
uniform), so token-level uncertainty is not assumed to pay off; the random
scorer is the control against which the others are measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Candidates:
    """Per-candidate arrays, all of shape (N,)."""

    logprob: np.ndarray
    """log pi(y_t | y_<t) of the sampled token."""
    entropy: np.ndarray
    """Entropy estimate of pi(. | y_<t) from the top-k logprobs."""
    top1_logprob: np.ndarray
    """max_a log pi(a | y_<t)."""
    visits: np.ndarray
    """Continuations observed through the prefix y_<t."""
    reward_sum: np.ndarray
    """Sum of their outcome rewards (successes for 0/1 rewards)."""


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


def score_entropy(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = H(pi(. | y_<t)), estimated from the top-k logprobs."""
    return c.entropy


def score_surprise(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = max_a log pi(a | y_<t) - log pi(y_t | y_<t)  (0 when the top token was sampled)."""
    return c.top1_logprob - c.logprob


def score_one_minus_max_prob(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = 1 - max_a pi(a | y_<t)."""
    return 1.0 - np.exp(c.top1_logprob)


def score_outcome_uncertainty(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = m (1 - m),  m = (s + 1) / (n + 2)  the Beta(1 + s, 1 + n - s) posterior mean of success.

    Largest for prefixes whose success rate is closest to 1/2: continuations
    from there disagree most, so a group sampled there carries the most
    learning signal. Unvisited prefixes get m = 1/2.
    """
    m = (c.reward_sum + 1.0) / (c.visits + 2.0)
    return m * (1.0 - m)


def score_random(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score ~ U(0, 1): the control."""
    return rng.random(len(c.logprob))


Scorer = Callable[[Candidates, np.random.Generator], np.ndarray]

SCORERS: dict[str, Scorer] = {
    "entropy": score_entropy,
    "surprise": score_surprise,
    "one_minus_max_prob": score_one_minus_max_prob,
    "outcome_uncertainty": score_outcome_uncertainty,
    "random": score_random,
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORERS)}")
    return SCORERS[name]
