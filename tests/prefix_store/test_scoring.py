import math

import numpy as np
import pytest

from prefix_store.scoring import SCORERS, Candidates, get_scorer
from protocol.uncertainty import entropy_from_topk


def cands():
    return Candidates(logprob=np.log([0.5, 0.1]), entropy=np.array([0.3, 1.2]), top1_logprob=np.log([0.5, 0.6]),
                      visits=np.array([2.0, 10.0]), reward_sum=np.array([1.0, 0.0]))


def test_entropy_from_full_support_is_exact():
    p = [0.5, 0.25, 0.25]
    assert entropy_from_topk([math.log(x) for x in p]) == pytest.approx(-sum(x * math.log(x) for x in p))


def test_entropy_from_topk_counts_residual_mass():
    h = entropy_from_topk([math.log(0.5)])
    assert h == pytest.approx(-0.5 * math.log(0.5) * 2)


def test_scorer_values():
    rng = np.random.default_rng(0)
    c = cands()
    assert np.allclose(get_scorer("surprise")(c, rng), [0.0, math.log(6)])
    assert np.allclose(get_scorer("one_minus_max_prob")(c, rng), [0.5, 0.4])
    m = np.array([2 / 4, 1 / 12])
    assert np.allclose(get_scorer("outcome_uncertainty")(c, rng), m * (1 - m))
    assert np.argmax(get_scorer("entropy")(c, rng)) == 1


def test_unknown_scorer_lists_valid_names():
    with pytest.raises(ValueError, match="unknown scorer 'nope'; choose one of " + ", ".join(SCORERS)):
        get_scorer("nope")


def test_entropy_from_topk_ignores_impossible_tokens():
    """A logprob of -inf (probability 0) adds nothing, instead of 0 * -inf = nan."""
    h = entropy_from_topk([math.log(0.5), math.log(0.5), float("-inf")])
    assert h == pytest.approx(math.log(2))
