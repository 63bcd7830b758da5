"""Which pair of a prompt's responses to show the rater. Pure: torch tensors and a random.Random in, indices out.

Input: the reward model's particle rewards R (n, K) of the n sampled responses to one prompt (K particles, see
learner/reward_model.py). Every selector returns one pair (i, j), i != j, of responses whose texts differ
(identical responses would be a tie by construction and waste a label), or None when there is no such pair.

    uncertainty      argmax_{i<j} var_k sigmoid(R[i, k] - R[j, k]): the pair whose preference probability the
                     particles disagree on most (the paper's "pair whose preference probability varies most
                     across the ensemble", Efficient Exploration at Scale, arXiv 2603.17378)
    random           a uniformly random pair (the passive baseline: what offline data collection does)
    double_thompson  draw two different particles k1, k2; i = argmax_i R[i, k1], j = argmax_{j != i} R[j, k2]
                     (double Thompson sampling, one of the exploration schemes of Dwaracherla et al. 2024,
                     arXiv 2402.00396): both responses are ones some plausible reward model would pick

Registry: `SELECTORS` (name -> function), looked up by `select_pair` with `protocol.registry.lookup`.
"""
from __future__ import annotations

import random
from typing import Callable, Hashable, Sequence

import torch

from learner.names import QUERY_SELECTIONS
from protocol.registry import lookup


def _distinct_pairs(n: int, keys: Sequence[Hashable] | None) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n) if keys is None or keys[i] != keys[j]]


def pair_variances(particles: torch.Tensor) -> torch.Tensor:
    """V[i, j] = var_k sigmoid(R[i, k] - R[j, k]) (population variance over the K particles).  (n, K) -> (n, n)."""
    p = torch.sigmoid(particles.unsqueeze(1) - particles.unsqueeze(0))  # (n, n, K)
    return p.var(dim=-1, unbiased=False)


def select_uncertainty(particles: torch.Tensor, rng: random.Random, keys=None) -> tuple[int, int] | None:
    pairs = _distinct_pairs(particles.size(0), keys)
    if not pairs:
        return None
    v = pair_variances(particles)
    return max(pairs, key=lambda ij: float(v[ij]))


def select_random(particles: torch.Tensor, rng: random.Random, keys=None) -> tuple[int, int] | None:
    pairs = _distinct_pairs(particles.size(0), keys)
    return rng.choice(pairs) if pairs else None


def select_double_thompson(particles: torch.Tensor, rng: random.Random, keys=None) -> tuple[int, int] | None:
    pairs = _distinct_pairs(particles.size(0), keys)
    if not pairs:
        return None
    allowed = set(pairs) | {(j, i) for i, j in pairs}
    k1, k2 = rng.sample(range(particles.size(1)), 2)
    i = int(particles[:, k1].argmax())
    others = [j for j in range(particles.size(0)) if (i, j) in allowed]
    if not others:  # the first pick has no distinct partner: fall back to the best pair under k2
        i, j = max(pairs, key=lambda ij: float(particles[ij[0], k2] + particles[ij[1], k2]))
        return i, j
    j = max(others, key=lambda j: float(particles[j, k2]))
    return i, j


SELECTORS: dict[str, Callable[..., tuple[int, int] | None]] = {
    "uncertainty": select_uncertainty,
    "random": select_random,
    "double_thompson": select_double_thompson,
}
"""Query selectors by name: f(particles (n, K), rng, keys=None) -> (i, j) or None (`preference.query_selection`)."""
SELECTOR_NAMES = tuple(SELECTORS)
assert SELECTOR_NAMES == QUERY_SELECTIONS, (SELECTOR_NAMES, QUERY_SELECTIONS)  # config validation reads learner.names


def select_pair(name: str, particles: torch.Tensor, rng: random.Random, keys=None) -> tuple[int, int] | None:
    """The pair the selector `name` asks about; keys[i] identifies response i's text (equal keys: not a pair)."""
    return lookup("query selection", SELECTORS, name)(particles, rng, keys)
