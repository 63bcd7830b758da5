"""The frontier rule of the seed paper's prefix-access learner, as a branch-point scorer. Pure numpy.

Per root, the deepest prefix believed to be on the chain is extended: along a
stored path the prefix before its first surprising token (the first token the
model did not rank first) is the part the model was sure of; on the chain task,
where the model prefers the right step while on track, that token is the
first wrong turn. So for each root the frontier is the deepest first-surprise
position over all its stored paths, and the branch point re-enters there and
*resamples* that position (store.branch_action=resample): the failing decision
gets siblings drawn from the policy, an on-policy baseline for it, and with
probability about q one of them takes the right step, one depth further than
before. At most one branch point per root per selection (the cap); every other
position scores -inf, which the store never hands out, so a step with fewer
frontier roots than branch slots fills the rest with fresh prompts. As the
policy learns, the first surprises of new paths move, and the frontier with
them.

score_t = depth_t + 1   if t is the deepest first-surprise position of its root
          -inf          otherwise
(deeper frontiers first: they are the fewest right steps away from a success).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from prefix_store.scoring import Candidates

SURPRISE_EPS = 1e-6
"""A sampled token is surprising when max_a log pi(a) - log pi(y_t) exceeds this (0 when the top token was sampled)."""


def frontier_positions(root: np.ndarray, depth: np.ndarray, surprise: np.ndarray, path_surprise: np.ndarray) -> np.ndarray:
    """(N,) bool: the deepest first-surprise position of each root (ties: the first row).

    root, depth: (N,) int root index and continuation position of each candidate; surprise: (N,) its surprise;
    path_surprise: (N,) the largest surprise before it on its path."""
    first = (surprise > SURPRISE_EPS) & (path_surprise <= SURPRISE_EPS)  # (N,)
    idx = np.flatnonzero(first)
    out = np.zeros(len(root), dtype=bool)
    if len(idx) == 0:
        return out
    order = idx[np.lexsort((idx, -depth[idx], root[idx]))]  # by root, deepest first, then the earlier row
    keep = np.concatenate([[True], root[order][1:] != root[order][:-1]])
    out[order[keep]] = True
    return out


def score_frontier(c: "Candidates", rng: np.random.Generator) -> np.ndarray:
    """depth + 1 at each root's deepest first-surprise position, -inf elsewhere (see the module docstring)."""
    depth = np.asarray(c.depth)
    mask = frontier_positions(np.asarray(c.root), depth, c.surprise, c.path_surprise)
    return np.where(mask, depth + 1.0, -np.inf)
