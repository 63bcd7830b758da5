"""Query selection: the most uncertain pair, random pairs, double Thompson; identical responses are never a pair."""
import random

import pytest
import torch

from learner.query_selection import SELECTOR_NAMES, pair_variances, select_pair


def _slow_variance(R, i, j):
    p = [1 / (1 + torch.exp(-(R[i, k] - R[j, k]))) for k in range(R.size(1))]
    m = sum(p) / len(p)
    return float(sum((x - m) ** 2 for x in p) / len(p))


def test_pair_variances_match_a_loop():
    R = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    V = pair_variances(R)
    for i in range(5):
        for j in range(5):
            assert float(V[i, j]) == pytest.approx(_slow_variance(R, i, j), abs=1e-6)


def test_uncertainty_picks_the_pair_the_particles_disagree_on():
    # responses 0, 1, 2 agree across particles; 3 is high under half the particles and low under the rest
    R = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [5.0, -5.0, 5.0, -5.0]])
    i, j = select_pair("uncertainty", R, random.Random(0))
    assert 3 in (i, j)
    # the best pair in a brute-force search over all pairs
    best = max(((a, b) for a in range(4) for b in range(a + 1, 4)), key=lambda ab: _slow_variance(R, *ab))
    assert (i, j) == best


def test_identical_responses_are_never_asked_about():
    R = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [0.0, 0.0]])
    keys = ["x", "x", "y"]  # 0 and 1 disagree most, but they are the same text
    for name in SELECTOR_NAMES:
        for seed in range(10):
            pair = select_pair(name, R, random.Random(seed), keys)
            assert pair is not None and keys[pair[0]] != keys[pair[1]], (name, pair)
        assert select_pair(name, R[:2], random.Random(0), ["x", "x"]) is None
        assert select_pair(name, R[:1], random.Random(0)) is None


def test_random_covers_every_pair_and_double_thompson_follows_the_particles():
    R = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    rng = random.Random(0)
    seen = {tuple(sorted(select_pair("random", R, rng))) for _ in range(200)}
    assert len(seen) == 6
    # one response is best under every particle: double Thompson always shows it
    R2 = torch.tensor([[0.0] * 4, [9.0] * 4, [1.0, 2.0, 1.0, 2.0], [2.0, 1.0, 2.0, 1.0]])
    for seed in range(10):
        i, j = select_pair("double_thompson", R2, random.Random(seed))
        assert i == 1 and j in (2, 3)


def test_unknown_selector_lists_the_names():
    with pytest.raises(ValueError, match="unknown query selection 'greedy'; choose one of uncertainty, random, double_thompson"):
        select_pair("greedy", torch.zeros(2, 2), random.Random(0))
