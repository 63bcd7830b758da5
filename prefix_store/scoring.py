"""Branch-point scorers: arrays of per-position observations in, scores out (higher = branch first).

Each candidate position t of a stored continuation carries what the model
showed when it sampled token y_t from the prefix y_<t, and the outcome
statistics of that prefix. Scorers are selected by name from SCORERS.

The seed paper's hard instance warns that the model can be *most* uncertain
exactly where it is lost (after a wrong turn the distribution is near
uniform), so token-level uncertainty is not assumed to pay off; the random
scorer is the control against which the others are measured.

A scorer may give -inf to positions it never wants handed out (the store skips
them; `frontier` does, to hand out at most one position per root).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from prefix_store.frontier import score_frontier
from protocol.registry import lookup


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

    def __len__(self) -> int:
        return len(self.logprob)

    @property
    def surprise(self) -> np.ndarray:
        """max_a log pi(a | y_<t) - log pi(y_t | y_<t), at least 0 (exactly 0 when the top token was sampled)."""
        return np.clip(self.top1_logprob - self.logprob, 0.0, None)

    step_conf: np.ndarray = None  # type: ignore[assignment]
    """ReBalance step confidence c_s of the step holding y_t (mean max-prob over the step)."""
    step_var: np.ndarray = None  # type: ignore[assignment]
    """ReBalance confidence variance v_s = (c_s - c_{s-1})^2 / 4."""
    path_surprise: np.ndarray = None  # type: ignore[assignment]
    """max over the earlier positions u < t of the same path of surprise_u = max_a log pi(a | y_<u) - log pi(y_u | y_<u)."""
    root: np.ndarray = None  # type: ignore[assignment]
    """Index of the root (prompt) whose tree holds the position."""
    depth: np.ndarray = None  # type: ignore[assignment]
    """t: continuation tokens before the position (0 = the first token after the prompt)."""


def score_entropy(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = H(pi(. | y_<t)), estimated from the top-k logprobs."""
    return c.entropy


def score_surprise(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = max_a log pi(a | y_<t) - log pi(y_t | y_<t)  (0 when the top token was sampled)."""
    return c.surprise


def score_first_surprise(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = surprise_t - max_{u<t} surprise_u  along the path (surprise as in score_surprise).

    High only at the first token of a path that the model did not expect: the
    end of the longest prefix it was sure of. On an outcome-reward chain where
    the model prefers the right step while it is on track, that is the first
    wrong turn, and branching there extends the proven prefix one step at a
    time (the seed paper's prefix-access learner). Later surprises on the same
    path score at most 0: they lie below a wrong turn, where nothing pays.
    """
    return c.surprise - c.path_surprise


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
    return rng.random(len(c))


def score_step_confidence(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = 1 - c_s: branch inside the steps the model was least sure of (ReBalance, arXiv 2603.12372)."""
    return 1.0 - c.step_conf


def score_confidence_variance(c: Candidates, rng: np.random.Generator) -> np.ndarray:
    """score = v_s = (c_s - c_{s-1})^2 / 4: branch where confidence swings between steps (ReBalance)."""
    return c.step_var


Scorer = Callable[[Candidates, np.random.Generator], np.ndarray]

SCORERS: dict[str, Scorer] = {
    "entropy": score_entropy,
    "surprise": score_surprise,
    "first_surprise": score_first_surprise,
    "one_minus_max_prob": score_one_minus_max_prob,
    "step_confidence": score_step_confidence,
    "confidence_variance": score_confidence_variance,
    "outcome_uncertainty": score_outcome_uncertainty,
    "random": score_random,
    "frontier": score_frontier,  # prefix_store/frontier.py: per root its deepest first surprise, -inf elsewhere
    "combined": None,  # type: ignore[dict-item]  # built by get_scorer from weights
}


def combined_scorer(weights: dict[str, float]) -> Scorer:
    """score = sum_j w_j * z(score_j),  z(x) = (x - mean x) / (std x + 1e-9) over the current candidates.

    Standardising first puts scorers with different units (nats, probabilities,
    variances) on one scale, so the weights say how much each one counts.
    """
    unknown = [n for n in weights if n not in SCORERS or n in ("combined", "frontier")]  # frontier: -inf, no z-score
    if unknown or not weights:
        raise ValueError(f"combined scorer weights {dict(weights)} must name scorers among "
                         f"{', '.join(n for n in SCORERS if n != 'combined')}")

    def score(c: Candidates, rng: np.random.Generator) -> np.ndarray:
        total = np.zeros(len(c))
        for name, w in weights.items():
            x = np.asarray(SCORERS[name](c, rng), dtype=np.float64)
            total += w * (x - x.mean()) / (x.std() + 1e-9)
        return total

    return score


def get_scorer(name: str, weights: dict[str, float] | None = None) -> Scorer:
    """SCORERS[name]; `combined` is built from `weights` (store.scorer_weights)."""
    scorer = lookup("scorer", SCORERS, name)
    return combined_scorer(dict(weights or {})) if name == "combined" else scorer
